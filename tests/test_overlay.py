"""overlay.py: a PNG preview of an image with predicted (magenta) and true (green) outlines."""

import cv2
import geopandas as gpd
import numpy as np
import rasterio
from shapely.geometry import box

from lib.cli import compose_config


def _box_file(path, ds, rows, cols):
    """A footprint covering image rows/cols (pixel ranges), saved in EPSG:4326 like inference's GeoJSON."""
    (x0, y0), (x1, y1) = ds.transform * (cols[0], rows[1]), ds.transform * (cols[1], rows[0])
    gpd.GeoDataFrame(geometry=[box(x0, y0, x1, y1)], crs=ds.crs).to_crs(4326).to_file(path)
    return path


def test_overlay_is_a_small_png_with_outlines_where_the_footprints_are(drone, tmp_path):
    import overlay

    with rasterio.open(drone) as ds:
        pred = _box_file(tmp_path / "pred.geojson", ds, (400, 700), (200, 500))
        gt = _box_file(tmp_path / "gt.geojson", ds, (100, 300), (300, 450))
    factor = 400 / 923

    def draw(name, *extra):
        cfg = [f"image={drone}", "max_size=400", f"output={tmp_path / name}", *extra]
        return cv2.cvtColor(cv2.imread(str(overlay.run(compose_config("overlay", cfg)))), cv2.COLOR_BGR2RGB)

    plain = draw("plain.png")
    assert plain.shape == (400, round(576 * factor), 3)
    for extra, colour, (r0, r1), (c0, c1) in (([f"pred={pred}"], overlay.PRED_COLOUR, (400, 700), (200, 500)),
                                              ([f"gt={gt}"], overlay.GT_COLOUR, (100, 300), (300, 450))):
        canvas = draw("o.png", *extra)
        changed = np.abs(canvas.astype(int) - plain).max(-1) > 40
        changed[:60, :160] = False  # leave out the legend
        rows, cols = np.nonzero(changed)
        assert np.allclose([rows.min(), rows.max(), cols.min(), cols.max()],
                           np.array([r0, r1, c0, c1]) * factor, atol=2)
        top_edge = canvas[round(r0 * factor), round((c0 + c1) / 2 * factor)]
        assert np.abs(top_edge.astype(int) - colour).max() < 60  # outline in its colour


def test_overlay_without_image_or_output_is_a_one_line_error(tmp_path):
    import pytest

    import overlay
    from lib.errors import UserError

    with pytest.raises(UserError, match="image=<raster> and output=<file.png>"):
        overlay.run(compose_config("overlay", [f"output={tmp_path / 'o.png'}"]))


def test_touching_predicted_buildings_get_different_colours_unless_per_instance_is_off(drone, tmp_path):
    import overlay

    with rasterio.open(drone) as ds:
        left = gpd.read_file(_box_file(tmp_path / "a.geojson", ds, (300, 600), (100, 300)))
        right = gpd.read_file(_box_file(tmp_path / "b.geojson", ds, (300, 600), (300, 500)))  # shares a wall
    both = tmp_path / "pair.geojson"
    gpd.GeoDataFrame(geometry=[*left.geometry, *right.geometry], crs=left.crs).to_file(both)
    factor = 400 / 923

    def edge_colours(*extra):
        cfg = [f"image={drone}", "max_size=400", f"output={tmp_path / 'p.png'}", f"pred={both}", *extra]
        canvas = cv2.cvtColor(cv2.imread(str(overlay.run(compose_config("overlay", cfg)))), cv2.COLOR_BGR2RGB)
        row = round(300 * factor)  # the top wall of each building, away from the shared one
        return [canvas[row, round(c * factor)].astype(int) for c in (200, 400)]

    a, b = edge_colours()
    assert np.abs(a - overlay.PALETTE[0]).max() < 60 and np.abs(b - overlay.PALETTE[1]).max() < 60
    assert np.abs(a - b).max() > 100 and overlay.GT_COLOUR not in overlay.PALETTE
    a, b = edge_colours("per_instance=false")
    assert np.abs(a - overlay.PRED_COLOUR).max() < 60 and np.abs(b - overlay.PRED_COLOUR).max() < 60
    assert overlay.instance_colours(10)[8] == overlay.PALETTE[0] and len(set(overlay.instance_colours(8))) == 8


def test_pred_and_gt_may_be_folders_holding_the_images_footprints(drone, tmp_path):
    """The folder inference.py prints (its footprints/<stem>.geojson) and a labels folder draw the same PNG
    as the files themselves; a folder without the image's footprints is a one-line error naming it."""
    import pytest

    import overlay
    from lib.errors import UserError

    run, labels = tmp_path / "run", tmp_path / "labels"
    (run / "footprints").mkdir(parents=True)
    labels.mkdir()
    with rasterio.open(drone) as ds:
        pred = _box_file(run / "footprints" / "drone.geojson", ds, (400, 700), (200, 500))
        gt = _box_file(labels / "drone.geojson", ds, (100, 300), (300, 450))
        _box_file(labels / "other.geojson", ds, (0, 50), (0, 50))  # another image's labels: not drawn

    def draw(name, p, g):
        cfg = [f"image={drone}", "max_size=400", f"output={tmp_path / name}", f"pred={p}", f"gt={g}"]
        return cv2.imread(str(overlay.run(compose_config("overlay", cfg))))

    files = draw("files.png", pred, gt)
    assert np.array_equal(draw("run.png", run, labels), files)
    assert np.array_equal(draw("footprints.png", run / "footprints", labels), files)
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'}: no footprints named after the image \\(drone"):
        (tmp_path / "empty").mkdir()
        overlay.run(compose_config("overlay", [f"image={drone}", f"output={tmp_path / 'x.png'}",
                                               f"pred={tmp_path / 'empty'}"]))
    assert not (tmp_path / "x.png").exists()
