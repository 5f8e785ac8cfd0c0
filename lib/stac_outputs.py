"""STAC items for a run's output scenes, so the results drop into a catalog next to the imagery.

    <run>/stac/<stem>.json     one Item per scene: footprint (EPSG:4326), projection, assets, provenance
    <run>/stac/catalog.json    a Catalog linking every Item of the run

An Item's geometry is the scene's outline (densified, so a UTM square stays true in EPSG:4326), its
`proj:*` fields (projection extension v2: `proj:code`, `proj:transform`, `proj:shape`) describe the
rasters' grid, and its assets are the probability map, the mask and the footprints with their roles
and media types. The provenance of the scene's outputs (model hashes, backend, precision used, TTA,
widths, resize factor, GSDs, threshold, toolkit version, settings fingerprint) are `buildings:*`
properties. Asset hrefs are relative, so a run folder can be moved or published as it is (the `derived_from` link
to the input image stays absolute). Plain
(non-georeferenced) images get an Item without geometry. Files are written atomically.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from lib import run_folder
from lib.files import write_json

COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
GEOTIFF_TYPE = "image/tiff; application=geotiff"
MEDIA_TYPES = {".geojson": "application/geo+json", ".gpkg": "application/geopackage+sqlite3",
               ".shp": "application/x-shapefile", ".fgb": "application/vnd.flatgeobuf"}
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
ASSETS = {  # output kind -> (asset key, title)
    "probability": ("probability", "Building probability (uint8 0-255; internal mask = no imagery)"),
    "mask": ("mask", "Building mask (0/255)"),
    "instance": ("instances", "Building border and contact probabilities (2 bands uint8 0-255)"),
    "geojson": ("footprints", "Building footprints (GeoJSON, EPSG:4326)"),
    "vector": ("footprints_native", "Building footprints (image CRS)"),
}


def scene_geometry(bounds, crs) -> tuple[dict, list[float]]:
    """GeoJSON polygon and bbox in EPSG:4326 of a scene's bounds in `crs` (edges densified)."""
    import shapely
    from rasterio.warp import transform_geom

    left, bottom, right, top = bounds
    outline = shapely.box(left, bottom, right, top)
    outline = outline.segmentize(max(right - left, top - bottom) / 16)
    geom = transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(outline))
    return geom, [round(v, 9) for v in shapely.geometry.shape(geom).bounds]


def scene_item(stem: str, outputs: dict[str, Path], grid: dict | None, properties: dict, *, cog: bool,
               source: str | os.PathLike | None = None, created: datetime.datetime | None = None):
    """A pystac.Item for one scene's outputs.

    `grid`: {"bounds", "crs", "transform", "shape"} of the georeferenced rasters (None for plain images);
    `properties`: provenance, stored with a `buildings:` prefix; `source`: the input image, linked as
    `derived_from`. The Item's datetime is the processing time (the input's acquisition time is not
    known here); `created` says the same.
    """
    import pystac
    from pystac.extensions.projection import ProjectionExtension

    created = created or datetime.datetime.now(datetime.UTC)
    geometry = bbox = None
    if grid is not None:
        geometry, bbox = scene_geometry(grid["bounds"], grid["crs"])
    props = {"created": created.isoformat(timespec="seconds").replace("+00:00", "Z")}
    props.update({f"buildings:{k}": v for k, v in properties.items()})
    item = pystac.Item(stem, geometry, bbox, created, props)
    item.stac_extensions.append(PROCESSING_SCHEMA)
    item.properties["processing:software"] = {"buildings-toolkit": properties.get("toolkit_version")}
    if properties.get("image_gsd"):
        item.common_metadata.gsd = properties["image_gsd"]
    if grid is not None:
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        epsg = grid["crs"].to_epsg()
        if epsg:
            proj.epsg = epsg
        else:
            proj.wkt2 = grid["crs"].to_wkt()
        proj.transform = list(grid["transform"])[:6]
        proj.shape = list(grid["shape"])
    raster_type = COG_TYPE if cog and grid is not None else GEOTIFF_TYPE
    for kind, path in outputs.items():
        key, title = ASSETS[kind]
        media = raster_type if path.suffix == run_folder.MAP_SUFFIX else MEDIA_TYPES.get(path.suffix.lower())
        item.add_asset(key, pystac.Asset(str(Path(path).resolve()), title=title, media_type=media, roles=["data"]))
    if source is not None:
        item.add_link(pystac.Link("derived_from", str(Path(source).resolve()), title="input image"))
    return item


def write_item(run_dir: str | os.PathLike, item) -> Path:
    """Write an Item to <run>/stac/<id>.json with hrefs relative to it; returns the path."""
    import pystac

    path = run_folder.stac_item_path(run_dir, item.id)
    item.set_self_href(str(path.resolve()))
    item.make_asset_hrefs_relative()
    catalog = run_folder.stac_catalog_path(run_dir)
    for rel in (pystac.RelType.ROOT, pystac.RelType.PARENT):
        item.add_link(pystac.Link(rel, "./" + catalog.name, media_type=pystac.MediaType.JSON))
    write_json(path, item.to_dict(include_self_link=False, transform_hrefs=False))
    return path


def write_catalog(run_dir: str | os.PathLike, stems: list[str], description: str) -> Path | None:
    """<run>/stac/catalog.json linking the Items of `stems` that exist; None when there are none."""
    import pystac

    run_dir = Path(run_dir)
    stems = [s for s in sorted(stems) if run_folder.stac_item_path(run_dir, s).is_file()]
    if not stems:
        return None
    catalog = pystac.Catalog(f"buildings-{run_dir.resolve().name}", description, title=run_dir.resolve().name)
    for stem in stems:
        catalog.add_link(pystac.Link(pystac.RelType.ITEM, f"./{stem}.json", media_type=pystac.MediaType.GEOJSON))
    path = run_folder.stac_catalog_path(run_dir)
    catalog.add_link(pystac.Link(pystac.RelType.ROOT, "./catalog.json", media_type=pystac.MediaType.JSON))
    data = catalog.to_dict(include_self_link=False, transform_hrefs=False)
    if run_folder.read_record(path) != data:  # a rerun that changes nothing leaves the file alone
        write_json(path, data)
    return path

