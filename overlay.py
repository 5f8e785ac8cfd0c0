"""Draw predicted (and true) footprints over an image as a PNG a person can open.

    python overlay.py image=scene.tif pred=out/footprints/scene.geojson gt=labels/scene.geojson output=overlay.png
    python overlay.py image=scene.tif pred=out gt=labels output=overlay.png    # folders: <scene>.geojson in them
    python overlay.py task=points image=<SAR scene folder> pred=<detections.csv> gt=<labels.csv> output=o.png

Ground-truth outlines are drawn in green. Predicted footprints are each outlined and lightly filled in
their own colour from a fixed palette without green (magenta first), so touching buildings that were
separated show as separate shapes; `per_instance=false` draws them all in magenta. The image is read at reduced
resolution (at most `max_size` pixels on its longer side) so a whole-city mosaic still gives a small
PNG quickly. `task=points`: the scene's first SAR channel in grey (normalised as the model sees it),
predicted points as magenta circles (filled when called vessels), labelled points as green squares;
CSVs (detections or xView3 labels) are filtered to the scene (`scene_id`, default: the scene's name),
GeoJSON points are placed by their coordinates. `pred`/`gt` may be folders (an inference run, its
`footprints/`, a labels folder): the footprints file named after the image is drawn.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from rasterio.enums import Resampling

from lib import geo_io, run_folder
from lib.cli import cli
from lib.errors import UserError
from lib.files import atomic_path

PRED_COLOUR = (255, 0, 255)  # RGB magenta
GT_COLOUR = (0, 230, 0)  # RGB green
# predicted instances, cycled in file order (neighbours get different colours); none of them green
PALETTE = ((255, 0, 255), (255, 140, 0), (0, 200, 255), (255, 230, 0), (230, 30, 30), (90, 90, 255),
           (255, 120, 180), (150, 60, 220))
FILL_ALPHA = 0.3  # weight of an instance's colour in its fill


def footprints_file(path: str | Path, image: str | Path) -> Path:
    """`path` itself, or for a folder the footprints of `image` in it: what inference.py writes
    (<run>/footprints/<stem>.geojson) or a labels folder holds (<stem>.geojson / .gpkg / ...), so the
    folder a run prints can be passed as it is."""
    path, stem = Path(path), Path(image).stem
    if not path.is_dir():
        return path
    folder = path / run_folder.FOOTPRINTS if (path / run_folder.FOOTPRINTS).is_dir() else path
    for suffix in geo_io.VECTOR_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise UserError(f"{folder}: no footprints named after the image ({stem}.geojson, .gpkg, ...)")


def _read_preview(ds, max_size: int) -> tuple[np.ndarray, float]:
    """RGB uint8 preview of the whole raster and the factor from raster pixels to preview pixels."""
    factor = min(1.0, max_size / max(ds.width, ds.height))
    shape = (max(1, round(ds.height * factor)), max(1, round(ds.width * factor)))
    bands, _ = geo_io.band_layout(ds)
    stretch = geo_io.stretch_range(ds, bands)
    data = ds.read(bands, out_shape=(len(bands),) + shape, resampling=Resampling.average).astype(np.float32)
    if stretch is not None:
        data = (data - stretch[:, :1, None]) / (stretch[:, 1:, None] - stretch[:, :1, None]) * 255
    rgb = np.clip(np.moveaxis(data, 0, -1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb), factor


def _pixel_rings(gdf, ds, factor: float) -> list[np.ndarray]:
    """Exterior rings of every polygon, in preview pixel coordinates (int32, for cv2.polylines)."""
    import shapely

    if ds.crs is not None and gdf.crs is not None:
        gdf = gdf.to_crs(ds.crs)
    inverse = ~ds.transform
    rings = []
    for poly in shapely.get_parts(gdf.geometry.values):
        if poly.is_empty or poly.geom_type != "Polygon":
            continue
        xy = np.asarray(poly.exterior.coords)[:, :2]
        cols, rows = inverse * (xy[:, 0], xy[:, 1])
        rings.append(np.round(np.stack([cols, rows], axis=1) * factor).astype(np.int32))
    return rings


def draw_overlay(image: str | Path, output: str | Path, pred: str | Path | None = None,
                 gt: str | Path | None = None, max_size: int = 1600, per_instance: bool = True) -> Path:
    """Write `output` (PNG): the image with ground-truth (green) outlines and predicted footprints, each
    in its own palette colour (`per_instance`) or all magenta."""
    with geo_io.open_raster(image) as ds:
        canvas, factor = _read_preview(ds, max_size)
        thickness = max(1, round(2 * max(canvas.shape[:2]) / 1600))
        if pred:
            rings = _pixel_rings(geo_io.load_footprints(footprints_file(pred, image)), ds, factor)
            colours = instance_colours(len(rings)) if per_instance else [PRED_COLOUR] * len(rings)
            _draw_instances(canvas, rings, colours, thickness)
        if gt:
            rings = _pixel_rings(geo_io.load_footprints(footprints_file(gt, image)), ds, factor)
            cv2.polylines(canvas, rings, isClosed=True, color=GT_COLOUR, thickness=thickness, lineType=cv2.LINE_AA)
    _legend(canvas, pred is not None, gt is not None)
    return _write_png(canvas, output)


def instance_colours(n: int) -> list[tuple[int, int, int]]:
    """The palette colour of each of `n` predicted footprints, in order."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def _draw_instances(canvas: np.ndarray, rings: list[np.ndarray], colours: list, thickness: int) -> None:
    """A light fill per footprint (blended once, so overlaps do not darken), then its outline on top."""
    fill = canvas.copy()
    for ring, colour in zip(rings, colours):
        cv2.fillPoly(fill, [ring], colour, lineType=cv2.LINE_8)
    cv2.addWeighted(fill, FILL_ALPHA, canvas, 1 - FILL_ALPHA, 0, dst=canvas)
    for ring, colour in zip(rings, colours):
        cv2.polylines(canvas, [ring], isClosed=True, color=colour, thickness=thickness, lineType=cv2.LINE_AA)


def _write_png(canvas: np.ndarray, output: str | Path) -> Path:
    output = Path(output)
    with atomic_path(output) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            raise UserError(f"{output}: could not write PNG")
    return output


def _legend(canvas: np.ndarray, has_pred: bool, has_gt: bool) -> None:
    entries = [("predicted", PRED_COLOUR)] * has_pred + [("ground truth", GT_COLOUR)] * has_gt
    for i, (text, colour) in enumerate(entries):
        y = 24 + 24 * i
        cv2.rectangle(canvas, (8, y - 16), (150, y + 6), (0, 0, 0), -1)
        cv2.putText(canvas, text, (14, y), cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 1, cv2.LINE_AA)


def _sar_preview(path: Path, max_size: int) -> tuple[np.ndarray, float, object]:
    """Grey RGB preview of a SAR scene's first channel (as normalised for the model), its factor, the dataset."""
    from lib.sar import SarSource, normalize_db

    src = SarSource(path)
    ds = src.datasets[0]
    factor = min(1.0, max_size / max(ds.width, ds.height))
    shape = (max(1, round(ds.height * factor)), max(1, round(ds.width * factor)))
    data = ds.read(1, out_shape=shape, resampling=Resampling.average).astype(np.float32)
    if not src.prepared:
        if ds.nodata is not None:
            data[data == ds.nodata] = np.nan
        data = normalize_db(data[..., None], src.scale[:1], src.offset[:1])[..., 0]
    grey = np.clip(data, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1)), factor, src


def _points_px(path: Path, src, scene_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) in scene pixels and a vessel flag of a detections/labels CSV or a vector file of points."""
    import pandas as pd

    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, dtype={"scene_id": str})
        if "scene_id" in df.columns:
            df = df[df["scene_id"] == scene_id]
        rc = df[["detect_scene_row", "detect_scene_column"]].to_numpy(float)
        vessel = df["is_vessel"].astype(str).str.lower().isin(["true", "1", "1.0"]).to_numpy() \
            if "is_vessel" in df.columns else np.zeros(len(df), bool)
        return rc, vessel
    gdf = geo_io.read_vector(path)
    if src.crs is not None and gdf.crs is not None:
        gdf = gdf.to_crs(src.crs)
    cols, rows = ~src.transform * (gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy())
    return np.stack([rows - 0.5, cols - 0.5], 1), np.zeros(len(gdf), bool)


def draw_point_overlay(image: str | Path, output: str | Path, pred=None, gt=None, max_size: int = 1600,
                       scene_id: str | None = None) -> Path:
    """Write `output` (PNG): the SAR scene with labelled (green squares) and predicted (magenta) points."""
    image = Path(image)
    canvas, factor, src = _sar_preview(image, max_size)
    scene_id = scene_id or (image.name if image.is_dir() else image.stem)
    r = max(3, round(6 * max(canvas.shape[:2]) / 1600))
    try:
        if gt:
            for (row, col), _ in zip(*_points_px(Path(gt), src, scene_id)):
                c = (round((col + 0.5) * factor), round((row + 0.5) * factor))
                cv2.rectangle(canvas, (c[0] - r - 2, c[1] - r - 2), (c[0] + r + 2, c[1] + r + 2), GT_COLOUR, 1)
        if pred:
            for (row, col), vessel in zip(*_points_px(Path(pred), src, scene_id)):
                c = (round((col + 0.5) * factor), round((row + 0.5) * factor))
                cv2.circle(canvas, c, r, PRED_COLOUR, -1 if vessel else 1, cv2.LINE_AA)
    finally:
        src.close()
    _legend(canvas, pred is not None, gt is not None)
    return _write_png(canvas, output)


def run(cfg) -> Path:
    if not cfg.image or not cfg.output:
        raise UserError("overlay.py needs image=<raster> and output=<file.png>")
    if cfg.task == "points":
        path = draw_point_overlay(cfg.image, cfg.output, cfg.pred, cfg.gt, cfg.max_size, cfg.scene_id)
    else:
        path = draw_overlay(cfg.image, cfg.output, cfg.pred, cfg.gt, cfg.max_size, bool(cfg.per_instance))
    print(f"overlay written to {path}")
    return path


@cli("overlay")
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()
