"""evaluate.py: scoring footprints, masks, SpaceNet CSVs and inference run folders against oracles."""

import json

import numpy as np
import pytest
import rasterio
from standins import polygonize

from lib.cli import compose_config
from lib.errors import UserError


def evaluate(*overrides):
    import evaluate as ev

    return ev.run(compose_config("evaluate", list(overrides)))


def test_solaris_oracle_gives_tp8_fp20_fn20(shared, tmp_path):
    d = shared / "data" / "solaris"
    out = tmp_path / "scores.json"
    result = evaluate(f"gt={d / 'gt.geojson'}", f"pred={d / 'pred.geojson'}", "min_area=0", f"output={out}")
    poly = result["polygon"]
    assert (poly["tp"], poly["fp"], poly["fn"]) == (8, 20, 20)
    for key in ("precision", "recall", "f1"):
        assert poly[key] == pytest.approx(0.285714, abs=1e-6)
    saved = json.loads(out.read_text())
    assert saved["polygon"]["tp"] == 8 and set(saved["per_image"]["gt"]) >= {"tp", "fp", "fn", "f1"}


def test_solaris_mask_oracle_gives_jaccard_one_on_the_image_grid(shared):
    d = shared / "data" / "solaris"
    result = evaluate(f"gt={d / 'geotiff_labels.geojson'}", f"pred_masks={d / 'sample_fp_mask_from_geojson.tif'}",
                      f"images={d / 'sample_geotiff.tif'}")
    assert result["pixel"] == {"jaccard": 1.0, "intersection": 33818, "union": 33818}


def test_mask_folders_pair_by_stem_and_pixel_jaccard_is_summed_over_images(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    a_pred, a_gt = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    a_pred[0:10, 0:10] = 255  # 100 px
    a_gt[0:10, 5:15] = 255  # 100 px, overlap 50 -> I 50, U 150
    b_pred, b_gt = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    b_gt[0:2, 0:2] = 255  # missed entirely -> I 0, U 4
    for name, p, g in (("a", a_pred, a_gt), ("b", b_pred, b_gt)):
        for folder, arr in ((pred_dir, p), (gt_dir, g)):
            with rasterio.open(folder / f"{name}.tif", "w", driver="GTiff", width=20, height=20, count=1,
                               dtype="uint8") as ds:
                ds.write(arr, 1)
    result = evaluate(f"gt_masks={gt_dir}", f"pred_masks={pred_dir}")
    assert result["pixel"] == {"jaccard": pytest.approx(50 / 154), "intersection": 50, "union": 154}
    assert result["per_image"]["a"]["jaccard"] == pytest.approx(1 / 3)
    assert result["per_image"]["b"]["jaccard"] == 0.0
    assert "polygon" not in result


def test_spacenet_csv_inputs_with_empty_images_and_confidence(tmp_path):
    gt = tmp_path / "gt.csv"
    pred = tmp_path / "pred.csv"
    gt.write_text("ImageId,BuildingId,PolygonWKT_Pix\n"
                  'img1,1,"POLYGON ((0 0, 10 0, 10 10, 0 10, 0 0))"\n'
                  'img1,2,"POLYGON ((20 20, 30 20, 30 30, 20 30, 20 20))"\n'
                  "img2,-1,POLYGON EMPTY\n"
                  'img3,1,"POLYGON ((0 0, 8 0, 8 8, 0 8, 0 0))"\n')
    pred.write_text("ImageId,BuildingId,PolygonWKT_Pix,Confidence\n"
                    'img1,1,"POLYGON ((0 0, 10 0, 10 9, 0 9, 0 0))",0.9\n'
                    'img1,2,"POLYGON ((0 0, 10 0, 10 10, 0 10, 0 0))",0.8\n'
                    'img2,1,"POLYGON ((0 0, 10 0, 10 10, 0 10, 0 0))",0.7\n'
                    "img3,-1,POLYGON EMPTY,1\n")
    result = evaluate(f"gt={gt}", f"pred={pred}")
    per = result["per_image"]
    assert (per["img1"]["tp"], per["img1"]["fp"], per["img1"]["fn"]) == (1, 1, 1)
    assert (per["img2"]["tp"], per["img2"]["fp"], per["img2"]["fn"]) == (0, 1, 0)
    assert (per["img3"]["tp"], per["img3"]["fp"], per["img3"]["fn"]) == (0, 0, 1)
    assert result["polygon"]["tp"] == 1 and result["polygon"]["fp"] == 2 and result["polygon"]["fn"] == 2
    assert result["polygon"]["f1"] == pytest.approx(2 * (1 / 3) * (1 / 3) / (2 / 3))


def test_inference_output_folder_scores_both_metrics(tmp_path, shared):
    """pred=<inference output> uses its masks/ and footprints/ against label footprints on the image grid."""
    import geopandas as gpd

    from lib import footprints

    d = shared / "data" / "solaris"
    with rasterio.open(d / "sample_fp_mask_from_geojson.tif") as m, rasterio.open(d / "sample_geotiff.tif") as img:
        mask = m.read(1) > 0
        profile = {"driver": "GTiff", "width": img.width, "height": img.height, "count": 1, "dtype": "uint8",
                   "crs": img.crs, "transform": img.transform}
        transform, crs = img.transform, img.crs
    out = tmp_path / "run"
    (out / "masks").mkdir(parents=True)
    with rasterio.open(out / "masks" / "scene.tif", "w", **profile) as ds:
        ds.write(np.where(mask, 255, 0).astype(np.uint8), 1)
    gdf = footprints.footprints_frame(polygonize(mask), transform, crs)
    footprints.write_footprints(gdf, out / "footprints" / "scene.geojson")
    labels = tmp_path / "labels"
    labels.mkdir()
    gpd.read_file(d / "geotiff_labels.geojson").to_file(labels / "scene.geojson")
    result = evaluate(f"gt={labels}", f"pred={out}", "min_area=0")
    assert result["pixel"]["jaccard"] == 1.0
    # every label is found by its rasterised-and-vectorised outline; the only extra blob is a 1-pixel
    # sliver that the pixel-centre rule split off a label
    assert (result["polygon"]["tp"], result["polygon"]["fp"], result["polygon"]["fn"]) == (43, 1, 0)


def test_evaluate_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate(f"gt={tmp_path / 'nope.geojson'}", f"pred={tmp_path}")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="ImageId"):
        evaluate(f"gt={bad}", f"pred={bad}")


def test_geojson_in_degrees_scores_as_in_utm_and_on_the_image_grid_with_min_area_in_m2(shared, tmp_path):
    import geopandas as gpd

    d = shared / "data" / "solaris"
    for name in ("gt", "pred"):
        gpd.read_file(d / f"{name}.geojson").to_crs(4326).to_file(tmp_path / f"{name}.geojson")
    runs = [evaluate(f"gt={d / 'gt.geojson'}", f"pred={d / 'pred.geojson'}", "min_area=20"),
            evaluate(f"gt={tmp_path / 'gt.geojson'}", f"pred={tmp_path / 'pred.geojson'}", "min_area=20"),
            evaluate(f"gt={tmp_path / 'gt.geojson'}", f"pred={tmp_path / 'pred.geojson'}", "min_area=20",
                     f"images={d / 'sample_geotiff.tif'}")]
    counts = [(r["polygon"]["tp"], r["polygon"]["fp"], r["polygon"]["fn"]) for r in runs]
    assert counts == [(8, 17, 18)] * 3  # 20 m^2 drops 5 polygons; degrees^2 would have dropped none
    assert runs[1]["outlines"]["gt"] == pytest.approx(runs[0]["outlines"]["gt"])
    assert runs[0]["outlines"]["gt"]["vertices_per_polygon"] == pytest.approx(6.7, abs=0.05)


def test_overlapping_ground_truth_polygons_are_scored_each_with_a_warning(tmp_path, capsys):
    import geopandas as gpd
    from shapely.geometry import box

    gt = gpd.GeoDataFrame(geometry=[box(0, 0, 10, 10), box(5, 5, 15, 15), box(60, 60, 70, 70)], crs="EPSG:32632")
    pred = gpd.GeoDataFrame({"confidence": [0.9, 0.8]}, geometry=[box(0, 0, 10, 10), box(5, 5, 15, 15)],
                            crs="EPSG:32632")
    gt.to_file(tmp_path / "gt.geojson")
    pred.to_file(tmp_path / "pred.geojson")
    result = evaluate(f"gt={tmp_path / 'gt.geojson'}", f"pred={tmp_path / 'pred.geojson'}")
    assert (result["polygon"]["tp"], result["polygon"]["fp"], result["polygon"]["fn"]) == (2, 0, 1)
    assert "2 ground-truth polygons overlap another" in capsys.readouterr().out


def test_points_task_scores_xview3_csvs_with_the_aggregate_metric(tmp_path):
    # One scene, two HIGH labels; one detection on the first (right class, length 60 vs 50 m), one 30 px
    # (300 m) away from the second, which is beyond the 200 m tolerance: loc TP 1, FP 1, FN 1 -> F 1/2;
    # vessel and fishing F 1; length 1 - 0.2 = 0.8; no shoreline folder: shore F 0 (warned).
    # aggregate = 1/2 * (1 + 0.8 + 1 + 1 + 0) / 5 = 0.38.
    (tmp_path / "gt.csv").write_text(
        "scene_id,detect_scene_row,detect_scene_column,is_vessel,is_fishing,vessel_length_m,"
        "distance_from_shore_km,confidence\n"
        "s1,100,100,True,True,50,10,HIGH\ns1,500,500,True,False,80,10,HIGH\n")
    (tmp_path / "pred.csv").write_text(
        "detect_scene_row,detect_scene_column,scene_id,is_vessel,is_fishing,vessel_length_m\n"
        "101,100,s1,True,True,60\n530,500,s1,True,False,80\n")
    out = tmp_path / "scores.json"
    with pytest.warns(UserWarning):
        result = evaluate("task=points", f"gt={tmp_path / 'gt.csv'}", f"pred={tmp_path / 'pred.csv'}",
                          f"output={out}")
    assert (result["loc"]["tp"], result["loc"]["fp"], result["loc"]["fn"]) == (1, 1, 1)
    assert result["aggregate"] == pytest.approx(0.5 * (1 + 0.8 + 1 + 1 + 0) / 5, abs=1e-9)
    saved = json.loads(out.read_text())
    assert {"loc_fscore", "loc_fscore_shore", "vessel_fscore", "fishing_fscore", "length_acc",
            "aggregate"} <= set(saved)


def test_points_task_scores_building_points_within_metres(tmp_path):
    import geopandas as gpd
    from shapely.geometry import Point

    crs = "EPSG:32636"
    gt = gpd.GeoDataFrame(geometry=[Point(0, 0), Point(100, 0), Point(200, 0)], crs=crs)
    pred = gpd.GeoDataFrame(geometry=[Point(1, 1), Point(104, 0), Point(500, 0)], crs=crs).to_crs("EPSG:4326")
    gt.to_file(tmp_path / "gt.geojson")
    pred.to_file(tmp_path / "pred.geojson")
    # within 3 m only (1, 1) matches; within 5 m (104, 0) too
    r3 = evaluate("task=points", f"gt={tmp_path / 'gt.geojson'}", f"pred={tmp_path / 'pred.geojson'}")
    r5 = evaluate("task=points", f"gt={tmp_path / 'gt.geojson'}", f"pred={tmp_path / 'pred.geojson'}",
                  "distance_m=5")
    assert (r3["tp"], r3["fp"], r3["fn"]) == (1, 2, 2)
    assert (r5["tp"], r5["fp"], r5["fn"]) == (2, 1, 1)


def test_points_task_refuses_an_unknown_task_and_missing_inputs():
    with pytest.raises(UserError, match="task=boxes"):
        evaluate("task=boxes", "gt=a.csv", "pred=b.csv")
    with pytest.raises(UserError, match="task=points"):
        evaluate("task=points", "gt=a.csv")
