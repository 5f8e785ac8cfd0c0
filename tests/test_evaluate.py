"""evaluate.py: scoring footprints, masks, SpaceNet CSVs and inference run folders against oracles."""

import json

import numpy as np
import pytest
import rasterio

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
    gdf = footprints.footprints_frame(footprints.polygonize(mask), transform, crs)
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
