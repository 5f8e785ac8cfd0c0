"""lib.point_outputs: submission CSV columns and units, georeferencing, atomic writes, merging, scoring."""

import json

import numpy as np
import pandas as pd
import pytest
from rasterio.crs import CRS
from rasterio.transform import from_origin

from lib.point_outputs import CSV_COLUMNS, merge_detections, pixel_to_lonlat, write_detections
from lib.xview3_metric import read_labels, read_predictions, score


def detections(rows, cols, vessel, fishing, length_px, objectness=None) -> pd.DataFrame:
    n = len(rows)
    return pd.DataFrame({"row": np.asarray(rows, float), "col": np.asarray(cols, float),
                         "objectness": np.full(n, 0.9) if objectness is None else objectness,
                         "length_px": np.asarray(length_px, float), "vessel": np.asarray(vessel, float),
                         "fishing": np.asarray(fishing, float)})


def test_a_pixel_centre_maps_to_its_known_lat_lon():
    # UTM 31N: easting 500000 on the equator is (3 E, 0 N); pixel (10, 20)'s centre sits there
    transform = from_origin(500000 - 20.5 * 10, 10.5 * 10, 10, 10)
    lon, lat = pixel_to_lonlat([10.0], [20.0], transform, CRS.from_epsg(32631))
    assert lon[0] == pytest.approx(3.0, abs=1e-9) and lat[0] == pytest.approx(0.0, abs=1e-9)
    # a geographic scene: centres half a pixel in from the transform's corner
    lon, lat = pixel_to_lonlat([0.0, 4.0], [0.0, 2.0], from_origin(10.0, 50.0, 0.01, 0.01), CRS.from_epsg(4326))
    np.testing.assert_allclose(lon, [10.005, 10.025]) and np.testing.assert_allclose(lat, [49.995, 49.955])
    assert np.isnan(pixel_to_lonlat([1.0], [1.0], transform, None)[0]).all()


def test_write_detections_gives_the_submission_csv_and_geojson_points(tmp_path):
    transform, crs = from_origin(500000 - 20.5 * 10, 10.5 * 10, 10, 10), CRS.from_epsg(32631)
    dets = detections([10.2, 30.6], [20.4, 7.5], vessel=[0.8, 0.2], fishing=[0.7, 0.9], length_px=[3.0, 5.5])
    csv, geo = tmp_path / "s1.csv", tmp_path / "s1.geojson"
    table = write_detections(dets, "s1", transform, crs, csv, geo, vessel_threshold=0.5, fishing_threshold=0.6,
                             gsd=10.0)
    back = pd.read_csv(csv)
    assert list(back.columns) == list(CSV_COLUMNS)
    assert back["detect_scene_row"].tolist() == [10, 31] and back["detect_scene_column"].tolist() == [20, 8]
    assert back["is_vessel"].tolist() == [True, False]
    assert back["is_fishing"].tolist() == [True, False]  # only vessels fish
    assert back["vessel_length_m"].tolist() == [30.0, 55.0]
    assert back["score"].tolist() == [0.9, 0.9]
    assert back["lon"][0] == pytest.approx(3.0 + 0.4 * 10 / 111319.5, abs=1e-7)  # unrounded position
    assert back["lat"][0] == pytest.approx(-0.2 * 10 / 110574.4, abs=1e-7)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)

    fc = json.loads(geo.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    f = fc["features"][0]
    assert f["geometry"]["type"] == "Point"
    assert f["geometry"]["coordinates"] == pytest.approx([back["lon"][0], back["lat"][0]])
    assert f["properties"]["scene_id"] == "s1" and f["properties"]["row"] == pytest.approx(10.2)
    assert f["properties"]["vessel_probability"] == pytest.approx(0.8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.csv", "s1.geojson"]  # no temporary files


def test_a_failed_write_leaves_no_files(tmp_path):
    bad = detections([1.0], [1.0], [0.5], [0.5], [1.0]).drop(columns="objectness")
    with pytest.raises(KeyError):
        write_detections(bad, "s", None, None, tmp_path / "a.csv", tmp_path / "a.geojson", 0.5, 0.5, 10.0)
    assert list(tmp_path.iterdir()) == []


def test_without_georeferencing_points_have_no_geometry(tmp_path):
    dets = detections([3.0], [4.0], [0.9], [0.1], [2.0])
    table = write_detections(dets, "p", None, None, tmp_path / "p.csv", tmp_path / "p.geojson", 0.5, 0.5, None)
    assert np.isnan(table["lat"][0]) and np.isnan(table["vessel_length_m"][0])
    feature = json.loads((tmp_path / "p.geojson").read_text())["features"][0]
    assert feature["geometry"] is None and feature["properties"]["detect_scene_row"] == 3


def test_merged_scenes_read_back_and_score_perfectly_against_the_same_points(tmp_path):
    rng = np.random.default_rng(0)
    transform, crs = from_origin(300000, 5000000, 10, 10), CRS.from_epsg(32633)
    labels, paths = [], []
    for k, scene in enumerate(["sceneA", "sceneB", "empty"]):
        n = 0 if scene == "empty" else 12
        rows, cols = rng.integers(250, 551, n).astype(float), rng.integers(250, 551, n).astype(float)
        vessel, fishing = rng.integers(0, 2, n).astype(float), rng.integers(0, 2, n).astype(float)
        length = rng.uniform(1, 20, n)
        dets = detections(rows + rng.uniform(-0.4, 0.4, n), cols + rng.uniform(-0.4, 0.4, n),
                          vessel, fishing, length)
        paths.append(tmp_path / f"{scene}.csv")
        write_detections(dets, scene, transform, crs, paths[-1], tmp_path / f"{scene}.geojson", 0.5, 0.5, 10.0)
        labels.append(pd.DataFrame({"scene_id": scene, "detect_scene_row": rows, "detect_scene_column": cols,
                                    "is_vessel": vessel == 1, "is_fishing": np.where(vessel == 1, fishing == 1, False),
                                    "vessel_length_m": length * 10, "distance_from_shore_km": 0.5,
                                    "confidence": "HIGH"}))
        shore = np.empty(1, dtype=object)
        shore[0] = np.array([[400.0, 400.0]])  # every point lies within the 220 px near-shore reach
        np.save(tmp_path / f"{scene}_shoreline.npy", shore, allow_pickle=True)
    assert merge_detections(paths, tmp_path / "detections.csv") == 24
    pred = read_predictions(tmp_path / "detections.csv")
    assert sorted(set(pred["scene_id"])) == ["sceneA", "sceneB"]
    gt_path = tmp_path / "labels.csv"
    pd.concat(labels).to_csv(gt_path, index=False)
    result = score(read_labels(gt_path), pred, shore_root=tmp_path)
    for key in ("loc_fscore", "loc_fscore_shore", "vessel_fscore", "fishing_fscore", "length_acc", "aggregate"):
        assert result[key] == pytest.approx(1.0), key


def test_merging_no_detections_writes_the_header_only(tmp_path):
    write_detections(detections([], [], [], [], []), "z", None, None, tmp_path / "z.csv", tmp_path / "z.geojson",
                     0.5, 0.5, 10.0)
    assert merge_detections([tmp_path / "z.csv"], tmp_path / "detections.csv") == 0
    assert (tmp_path / "detections.csv").read_text().strip() == ",".join(CSV_COLUMNS)
