"""dataset.py: the data-preparation CLI on the real shared data and bad input, the training dataset, and the
resumable sampling (epoch order, re-seeded augmentation, balanced weights) training uses."""

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.features import rasterize
from shapely.geometry import Polygon, box

import dataset
from dataset import (
    ChipDataset,
    EpochBatches,
    balanced_weights,
    list_chips,
    seed_transform,
    split_folds,
    train_transform,
    val_transform,
)
from lib.cli import REPO_DIR, compose_config
from lib.distributed import Dist
from lib.errors import UserError
from lib.model_contract import IMAGENET_MEAN, IMAGENET_STD
from lib.scene_sources import DataWarning


def prep(**overrides):
    """Run data preparation with the CLI's config plus overrides (single process unless asked)."""
    overrides.setdefault("num_workers", 0)
    overrides.setdefault("progress", False)
    args = [f"{k}={v}" for k, v in overrides.items()]
    return dataset.run(compose_config("dataset", args))


def chip_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).rglob("*") if p.is_file()) if Path(out_dir).exists() else []


def read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# --- real data --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kampala_stac_writes_a_chip_per_building_matching_an_independent_rasterisation(shared, tmp_path):
    base = shared / "data" / "kampala"
    out = tmp_path / "chips"
    with pytest.warns(DataWarning, match="repaired 1 invalid geometry"):
        summary = prep(base_dir=base, out_dir=out, image_format="tif", num_workers=2)
    assert summary["written"] == 108 and summary["positive"] >= 100
    folder = out / "kam" / "81046528"
    assert json.loads((out / "resolutions.json").read_text()) == {"kam/81046528": pytest.approx(0.0746, abs=1e-3)}

    src = rasterio.open(base / "kam" / "81046528" / "81046528.tif")
    labels = gpd.read_file(base / "kam" / "81046528-labels" / "81046528.geojson").to_crs(src.crs)
    geoms = [g for g in shapely.make_valid(labels.geometry.values) if g.area > 0]
    assert len(geoms) == 108
    non_empty = 0
    for i, building in enumerate(geoms):
        chip = rasterio.open(folder / f"1_{i}.tif")
        mask = read_png(folder / f"1_{i}_mask.png")
        ignore_path = folder / f"1_{i}_ignore.png"
        ignore = read_png(ignore_path) > 0 if ignore_path.exists() else np.zeros(mask.shape, bool)
        # georeferenced chip on the source grid, centred on its building with 256 px around it
        assert chip.crs == src.crs and chip.res == pytest.approx(src.res)
        assert box(*chip.bounds).contains(building.centroid)
        minx, _, _, maxy = building.bounds
        assert chip.bounds.left == pytest.approx(minx - 256 * src.res[0], abs=src.res[0])
        assert chip.bounds.top == pytest.approx(maxy + 256 * src.res[1], abs=src.res[1])
        # mask: every footprint burned on the chip grid (all_touched like the original), 0 under nodata
        expected = rasterize(geoms, out_shape=mask.shape, transform=chip.transform, all_touched=True) * 255
        expected[ignore] = 0
        np.testing.assert_array_equal(mask, expected, err_msg=f"chip 1_{i}")
        non_empty += bool(mask.any())
        # pixels: the source RGB where the source has imagery
        col, row = ~src.transform @ (chip.transform.c, chip.transform.f)
        window = rasterio.windows.Window(round(col), round(row), chip.width, chip.height)
        rgba = src.read(window=window, boundless=True, fill_value=0)
        valid = rgba[3] > 0
        np.testing.assert_array_equal(valid, ~ignore)
        np.testing.assert_array_equal(chip.read()[:, valid], rgba[:3, valid])
    assert non_empty >= 100


@pytest.mark.slow
def test_cli_solaris_pairs_grid_mask_is_identical_to_the_oracle_with_relative_paths(shared, tmp_path):
    data = tmp_path / "D"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    shutil.copy(shared / "data" / "solaris" / "sample_geotiff.tif", data / "images" / "sample_geotiff.tif")
    shutil.copy(shared / "data" / "solaris" / "geotiff_labels.geojson", data / "labels" / "sample_geotiff.geojson")
    cmd = [sys.executable, str(REPO_DIR / "dataset.py"), "base_dir=D", "source=pairs", "mode=grid", "tile_size=900",
           "all_touched=false", "out_dir=X"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "1 chips written" in result.stdout
    masks = list((tmp_path / "X").rglob("*_mask.png"))
    assert [m.relative_to(tmp_path / "X").as_posix() for m in masks] == ["D/sample_geotiff/1_0_mask.png"]
    oracle = rasterio.open(shared / "data" / "solaris" / "sample_fp_mask_from_geojson.tif").read(1)
    np.testing.assert_array_equal(read_png(masks[0]), oracle)
    assert (read_png(masks[0]) > 0).sum() == 33818
    # the uint16 single band is stretched and replicated to RGB
    image = cv2.imread(str(tmp_path / "X" / "D" / "sample_geotiff" / "1_0.jpg"))
    assert image.shape == (900, 900, 3) and image.std() > 20
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def test_spacenet_rio_3band_and_8band_pairs_with_mosaic_edge_as_nodata(shared, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = prep(base_dir=shared / "data" / "spacenet-rio", out_dir=tmp_path, pad=32)
    empty = [w for w in caught if "no building footprints" in str(w.message)]
    assert len(empty) == 6  # img1-img3, for 3band and 8band
    assert summary["scenes"] == 20
    res = json.loads((tmp_path / "resolutions.json").read_text())
    assert res["spacenet-rio/3band_013022223130_Public_img4"] == pytest.approx(0.46, abs=0.01)
    assert res["spacenet-rio/8band_013022223130_Public_img4"] == pytest.approx(1.84, abs=0.03)
    for kind, count in (("3band", 119), ("8band", 119)):
        scenes = sorted((tmp_path / "spacenet-rio").glob(f"{kind}_*"))
        assert len(scenes) == 10  # every tile contributes, empty ones with a negative chip
        masks = [read_png(m) for s in scenes for m in s.glob("*_mask.png")]
        assert sum(m.any() for m in masks) >= count - 5  # tiny buildings can vanish at 2 m
        ignores = [read_png(p) for s in scenes for p in s.glob("*_ignore.png")]
        assert len(ignores) > len(masks) / 2  # the black mosaic edge is nodata
        for negative in [s for s in scenes if s.name.endswith(("img1", "img2", "img3"))]:
            assert not read_png(next(negative.glob("*_mask.png"))).any()
    # 8-band uint16 is stretched by its 2-98 percentiles over imagery pixels: full contrast, not black
    folder = tmp_path / "spacenet-rio" / "8band_013022223130_Public_img8"
    pixels = []
    for path in folder.glob("1_*[0-9].jpg"):
        ignore = folder / f"{path.stem}_ignore.png"
        img = cv2.imread(str(path))
        pixels.append(img[read_png(ignore) == 0] if ignore.exists() else img.reshape(-1, 3))
    pixels = np.concatenate(pixels)
    assert 40 < pixels.mean() < 200 and np.percentile(pixels, 99) > 200 and np.percentile(pixels, 1) < 40


def test_csv_index_source_reads_img_and_label_uris(shared, tmp_path):
    base = shared / "data" / "kampala"
    with pytest.warns(DataWarning):
        summary = prep(base_dir=base, source="csv", out_dir=tmp_path, max_samples=4)
    assert summary["written"] == 4
    assert len(list((tmp_path / "kam" / "81046528").glob("1_*[0-9].jpg"))) == 4


# --- demo scene, modes, scales, resume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from lib.demo_scene import ensure_demo_scene

    return ensure_demo_scene(tmp_path_factory.mktemp("demo") / "demo")


@pytest.mark.slow
def test_demo_default_prep_gives_building_chips_for_three_scenes(demo, tmp_path):
    summary = prep(base_dir=demo, out_dir=tmp_path, num_workers=2)
    chips = list_chips(tmp_path)
    assert summary["written"] == len(chips) >= 240
    assert {c.scene for c in chips} == {"demo/demo_a", "demo/demo_b", "demo/demo_c"}
    assert all(c.gsd == pytest.approx(0.1) for c in chips)
    assert sum(c.ignore is not None for c in chips) > 10  # the no-data corner


def test_grid_mode_tiles_with_overlap_and_negative_ratio(tmp_path):
    make_pair(tmp_path / "d", geoms=[box(450_002, 39_982, 450_008, 39_988)])  # pixels 20-80 x 120-180
    everything = prep(base_dir=tmp_path / "d", out_dir=tmp_path / "a", mode="grid", tile_size=100, overlap=50,
                      negative_ratio=1)
    assert everything["written"] == 25  # starts 0, 50, 100, 150, 200 on a 300 px side
    positives = prep(base_dir=tmp_path / "d", out_dir=tmp_path / "b", mode="grid", tile_size=100, overlap=50,
                     negative_ratio=0)
    assert positives["written"] == positives["positive"] == 6  # row starts 50/100/150 x column starts 0/50
    names = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "b").rglob("*_mask.png"))
    assert names == [5, 6, 10, 11, 15, 16]
    assert cv2.imread(str(tmp_path / "b" / "d" / "x" / "1_10.jpg")).shape == (100, 100, 3)


def test_scales_resample_chips_and_rasterise_masks_on_the_output_grid(demo, tmp_path):
    prep(base_dir=demo / "test", out_dir=tmp_path, scale="[1,2,0.5]", pad=64, image_format="tif")
    folder = tmp_path / "test" / "demo_test"
    labels = gpd.read_file(demo / "test" / "labels" / "demo_test.geojson").to_crs("EPSG:32636")
    for scale, res in (("1", 0.1), ("2", 0.2), ("0.5", 0.05)):
        for i in (0, 7, 20):
            chip = rasterio.open(folder / f"{scale}_{i}.tif")
            assert chip.res == pytest.approx((res, res))
            assert box(*chip.bounds).contains(labels.geometry[i].centroid)
            assert chip.width * res == pytest.approx(labels.geometry[i].bounds[2] - labels.geometry[i].bounds[0]
                                                     + 2 * 64 * res, abs=res + 0.25)  # `pad` counts chip pixels
            mask = read_png(folder / f"{scale}_{i}_mask.png")
            expected = rasterize(labels.geometry, out_shape=mask.shape, transform=chip.transform, all_touched=True)
            ignore = folder / f"{scale}_{i}_ignore.png"
            if ignore.exists():
                expected[read_png(ignore) > 0] = 0
            np.testing.assert_array_equal(mask, expected * 255)
    chips = list_chips(tmp_path)
    assert {round(c.gsd, 3) for c in chips} == {0.05, 0.1, 0.2}


def test_resume_skips_existing_chips_and_rewrites_missing_ones(demo, tmp_path):
    first = prep(base_dir=demo, out_dir=tmp_path, max_samples=12)
    assert first["written"] == 12
    before = {p: p.stat().st_mtime_ns for p in chip_files(tmp_path) if p.suffix == ".jpg"}
    victim = sorted(before)[3]
    victim.unlink()
    second = prep(base_dir=demo, out_dir=tmp_path, max_samples=12)
    assert (second["written"], second["skipped"]) == (1, 11)
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != victim)
    assert not [p for p in chip_files(tmp_path) if p.name.startswith(".")]  # no temporary files left


def test_image_smaller_than_the_tile_is_padded_and_the_padding_ignored(shared, tmp_path):
    base = tmp_path / "in"
    (base / "3band").mkdir(parents=True)
    (base / "geojson").mkdir()
    src = shared / "data" / "spacenet-rio"
    shutil.copy(src / "3band" / "3band_013022223130_Public_img8.tif", base / "3band")
    shutil.copy(src / "geojson" / "013022223130_Public_img8_Geo.geojson", base / "geojson")
    prep(base_dir=base, out_dir=tmp_path / "out", mode="grid", tile_size=512)
    folder = tmp_path / "out" / "in" / "3band_013022223130_Public_img8"
    image = cv2.imread(str(folder / "1_0.jpg"))
    ignore = read_png(folder / "1_0_ignore.png") > 0
    assert image.shape == (512, 512, 3)  # the tile is 439 x 406 px
    assert ignore[406:].all() and ignore[:, 439:].all()
    assert not read_png(folder / "1_0_mask.png")[ignore].any()


# --- bad input: one line naming the file, the scene skipped (nothing written for it) ----------------


def make_pair(root: Path, name: str = "x", geoms=None, crs="EPSG:32636", image_crs="EPSG:32636", size=300):
    """A small georeferenced RGB image + GeoJSON labels as images/<name>.tif + labels/<name>.geojson."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    transform = Affine(0.1, 0, 450_000, 0, -0.1, 40_000)
    image = root / "images" / f"{name}.tif"
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "transform": transform, "tiled": True, "blockxsize": 128, "blockysize": 128, "compress": "deflate"}
    if image_crs:
        profile["crs"] = image_crs
    with rasterio.open(image, "w", **profile) as dst:
        dst.write(np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8))
    if geoms is None:
        geoms = [box(450_005, 39_980, 450_010, 39_985)]
    labels = root / "labels" / f"{name}.geojson"
    gdf = gpd.GeoDataFrame({"building": ["yes"] * len(geoms)}, geometry=geoms, crs=crs)
    if len(geoms):
        gdf = gdf.to_crs("EPSG:4326")
    gdf.to_file(labels, driver="GeoJSON")
    return image, labels


def assert_fails(match: str, out: Path, **overrides) -> str:
    """The only scene fails: reported as one line matching `match`, and nothing is written."""
    summary = prep(out_dir=out, **overrides)
    (message,) = summary["failed"]
    assert re.search(match, message) and "\n" not in message
    assert summary["written"] == 0 and chip_files(out) == []
    return message


def test_missing_image_in_csv_index_is_named(tmp_path):
    make_pair(tmp_path / "d")
    (tmp_path / "d" / "train_metadata.csv").write_text("img_uri,label_uri\nimages/nope.tif,labels/x.geojson\n")
    assert_fails(r"images/nope\.tif: image file does not exist", tmp_path / "out", base_dir=tmp_path / "d")


def test_unreadable_image_is_named(tmp_path):
    image, _ = make_pair(tmp_path / "d")
    image.write_bytes(b"this is not a tiff")
    assert_fails(r"x\.tif: not a readable raster", tmp_path / "out", base_dir=tmp_path / "d")


def test_truncated_tiff_is_named(tmp_path):
    image, _ = make_pair(tmp_path / "d", size=600)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])
    assert_fails(r"x\.tif: (corrupt or truncated|not a readable)", tmp_path / "out", base_dir=tmp_path / "d")


def test_missing_label_file_is_named(tmp_path):
    _, labels = make_pair(tmp_path / "d")
    labels.unlink()
    assert_fails(r"x\.tif: label file missing", tmp_path / "out", base_dir=tmp_path / "d")
    (tmp_path / "d" / "train_metadata.csv").write_text("img_uri,label_uri\nimages/x.tif,labels/x.geojson\n")
    assert_fails(r"labels/x\.geojson: label file does not exist", tmp_path / "out", base_dir=tmp_path / "d")


def test_empty_geojson_yields_negatives_only_with_a_warning(tmp_path):
    make_pair(tmp_path / "d", geoms=[])
    with pytest.warns(DataWarning, match=r"x\.geojson: no building footprints"):
        summary = prep(base_dir=tmp_path / "d", out_dir=tmp_path / "out")
    assert summary["written"] >= 1 and summary["positive"] == 0
    assert all(not read_png(m).any() for m in (tmp_path / "out").rglob("*_mask.png"))


def test_labels_not_overlapping_the_image_are_refused(tmp_path):
    make_pair(tmp_path / "d", geoms=[box(460_000, 39_980, 460_010, 39_990)])
    assert_fails(r"x\.geojson: no footprint overlaps the image", tmp_path / "out", base_dir=tmp_path / "d")


@pytest.mark.filterwarnings("ignore:.crs. was not provided")
def test_missing_crs_on_image_or_labels_is_named(tmp_path):
    make_pair(tmp_path / "a", image_crs=None)
    assert_fails(r"x\.tif: image has no CRS", tmp_path / "out", base_dir=tmp_path / "a")
    make_pair(tmp_path / "b")
    (tmp_path / "b" / "labels" / "x.geojson").unlink()
    gpd.GeoDataFrame(geometry=[box(5, 5, 10, 10)]).to_file(tmp_path / "b" / "labels" / "x.gpkg")
    assert_fails(r"x\.gpkg: labels have no CRS", tmp_path / "out", base_dir=tmp_path / "b")


def test_invalid_geometries_are_repaired_and_zero_area_ones_dropped_with_warnings(tmp_path):
    bowtie = Polygon([(450_005, 39_980), (450_010, 39_985), (450_010, 39_980), (450_005, 39_985)])
    flat = Polygon([(450_012, 39_980), (450_015, 39_980), (450_018, 39_980)])
    good = box(450_020, 39_980, 450_024, 39_984)
    make_pair(tmp_path / "d", geoms=[bowtie, flat, good])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = prep(base_dir=tmp_path / "d", out_dir=tmp_path / "out", pad=16)
    messages = " ".join(str(w.message) for w in caught)
    assert "repaired" in messages and "dropped 1" in messages
    assert summary["written"] == 2 and summary["positive"] == 2


def test_stac_asset_href_that_does_not_exist_is_named(shared, tmp_path):
    base = tmp_path / "kampala"
    shutil.copytree(shared / "data" / "kampala", base, ignore=shutil.ignore_patterns("*.tif"))
    message = assert_fails(r"81046528\.json: asset href \./81046528\.tif does not exist", tmp_path / "out", base_dir=base)
    assert "81046528.tif" in message


@pytest.mark.slow
def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path):
    cmd = [sys.executable, str(REPO_DIR / "dataset.py"), "base_dir=nowhere", "out_dir=X"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nowhere: base_dir does not exist"
    assert not (tmp_path / "X").exists()


# --- training dataset --------------------------------------------------------------------------------


def write_chip(folder: Path, name: str, colour, mask=None, ignore=None, size=(48, 64), ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    image = np.zeros(size + (3,), np.uint8)
    image[:] = colour
    cv2.imwrite(str(folder / f"{name}.{ext}"), image[..., ::-1])
    if mask is not None:
        cv2.imwrite(str(folder / f"{name}_mask.png"), mask)
    if ignore is not None:
        cv2.imwrite(str(folder / f"{name}_ignore.png"), ignore)


@pytest.fixture
def chips_dir(tmp_path) -> Path:
    root = tmp_path / "chips"
    soft = np.zeros((48, 64), np.uint8)
    soft[10:20, 10:30] = 128
    hard = np.zeros((48, 64), np.uint8)
    hard[5:15, 5:15] = 255
    ignore = np.zeros((48, 64), np.uint8)
    ignore[:, 50:] = 255
    write_chip(root / "c" / "s1", "1_0", (10, 200, 30), mask=soft)
    write_chip(root / "c" / "s1", "1_1", (0, 0, 0))  # no mask: negative sample
    write_chip(root / "c" / "s2", "2_0", (255, 255, 255), mask=hard, ignore=ignore)
    write_chip(root / "c" / "s3", "1_0", (1, 2, 3), mask=hard, ext="jpg")
    (root / "resolutions.json").write_text(json.dumps({"c/s1": 0.05, "c/s2": 0.1}))
    return root


def test_list_chips_pairs_images_with_masks_ignore_scene_and_gsd(chips_dir):
    chips = list_chips(chips_dir)
    assert [c.image.relative_to(chips_dir).as_posix() for c in chips] == [
        "c/s1/1_0.png", "c/s1/1_1.png", "c/s2/2_0.png", "c/s3/1_0.jpg"]
    assert [c.mask is not None for c in chips] == [True, False, True, True]
    assert [c.ignore is not None for c in chips] == [False, False, True, False]
    assert [c.scene for c in chips] == ["c/s1", "c/s1", "c/s2", "c/s3"]
    assert [c.gsd for c in chips] == [0.05, 0.05, pytest.approx(0.2), None]  # scale 2 doubles the GSD


def test_chip_dataset_items_are_normalised_with_soft_masks_ignore_and_negatives(chips_dir):
    items = [ChipDataset(list_chips(chips_dir), val_transform(64))[i] for i in range(4)]
    first = items[0]
    assert first["image"].shape == (3, 64, 64) and first["image"].dtype.is_floating_point
    expected = (np.array([10, 200, 30]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(first["image"][:, 32, 32].numpy(), expected, atol=1e-5)
    assert first["mask"].shape == (64, 64) and first["mask"].max().item() == pytest.approx(128 / 255)
    assert first["has_building"].item() == 1.0 and first["gsd"].item() == pytest.approx(0.05)
    # 48 px tall chip padded to 64: the padding is ignored, never background
    assert first["ignore"][:8].eq(1).all() and first["ignore"][8:56].eq(0).all()
    negative = items[1]
    assert negative["mask"].sum().item() == 0 and negative["has_building"].item() == 0.0
    ignored = items[2]
    assert ignored["ignore"][8:56, 50:].eq(1).all() and ignored["mask"][ignored["ignore"] > 0].sum() == 0
    assert np.isnan(items[3]["gsd"].item()) and items[3]["path"].endswith("c/s3/1_0.jpg")


def test_gsd_rescaling_resizes_chips_to_the_reference_scale(chips_dir):
    chips = list_chips(chips_dir)
    ds = ChipDataset(chips, ref_scale=0.1)
    assert ds.load(0)["image"].shape == (24, 32, 3) and ds.load(0)["gsd"] == 0.1  # 5 cm -> 10 cm
    assert ds.load(2)["image"].shape == (96, 128, 3)  # 20 cm -> 10 cm
    assert ds.load(3)["image"].shape == (48, 64, 3)  # unknown GSD: unchanged


def test_decoded_chips_are_kept_within_the_budget_and_give_the_same_items(chips_dir):
    """chip_cache_mb: a revisited chip is served from memory (its files may be gone), items equal the
    uncached ones, the cached arrays are read-only and the least recently used chip goes first."""
    chips = list_chips(chips_dir)
    plain = ChipDataset(chips, train_transform(32, level="light"))
    cached = ChipDataset(chips, train_transform(32, level="light"), cache_mb=1)
    for ds in (plain, cached):
        seed_transform(ds.transform, [0, 0, 0, 2])
    a, b = plain[2], cached[2]
    for key in ("image", "mask", "ignore", "instances", "border", "contact"):
        assert torch.equal(a[key], b[key]), key
    raw = cached.load(2)
    assert not raw["image"].flags.writeable and cached.decoded.used > 0
    for path in (chips[2].image, chips[2].mask, chips[2].ignore):
        path.unlink()
    assert cached.load(2) is raw  # served from memory: its files are no longer read
    with pytest.raises(UserError, match="not a readable image"):
        plain.load(2)
    size = cached.decoded.used
    tight = ChipDataset(chips, cache_mb=2.5 * size / 2**20)  # room for two chips
    tight.load(0), tight.load(3)
    first = tight.load(0)  # 0 is now the most recent
    tight.load(1)
    assert tight.decoded.used <= tight.decoded.budget
    assert tight.load(0) is first and tight.decoded.get(3) is None


def test_train_transform_moves_mask_and_ignore_with_the_image():
    rng = np.random.default_rng(0)
    image = np.zeros((200, 200, 3), np.uint8)
    mask = np.zeros((200, 200), np.uint8)
    for _ in range(12):
        x, y = rng.integers(0, 170, 2)
        mask[y:y + 30, x:x + 30] = 255
    image[..., 0] = mask
    image[..., 1] = 120
    valid = np.full((200, 200), 255, np.uint8)
    valid[:, :40] = 0
    image[:, :40, 1] = 0
    transform = train_transform(128)
    agree = []
    for seed in range(12):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask, valid=valid)
        assert out["image"].shape == (128, 128, 3) and out["mask"].shape == out["valid"].shape == (128, 128)
        keep = out["valid"] > 0
        agree.append(((out["image"][..., 0] > 128) == (out["mask"] > 128))[keep].mean())
        # invalid (ignored) pixels: the source's no-data strip or padding/rotation borders, all dark
        assert (~keep).sum() == 0 or out["image"][..., 1][~keep].mean() < 40
    assert np.median(agree) > 0.95


def test_split_folds_by_scene_has_no_leakage_and_covers_every_chip():
    chips = [dataset.Chip(Path(f"s{s}/{i}.jpg"), None, None, f"c/s{s}") for s in range(9) for i in range(s + 1)]
    seen = []
    for fold in range(3):
        train, val = split_folds(chips, fold, num_folds=3)
        assert val and {c.scene for c in train}.isdisjoint({c.scene for c in val})
        assert len(train) + len(val) == len(chips)
        seen += val
    assert sorted(map(str, (c.image for c in seen))) == sorted(map(str, (c.image for c in chips)))
    assert split_folds(chips, 1, 3, seed=0) == split_folds(chips, 1, 3, seed=0)


def test_split_folds_by_chip_is_the_original_kfold_and_single_scene_falls_back_to_it():
    chips = [dataset.Chip(Path(f"{i}.jpg"), None, None, "c/only") for i in range(70)]
    with pytest.warns(DataWarning, match="one scene"):
        train, val = split_folds(chips, 0)
    assert len(val) == 10 and len(train) == 60
    vals = [split_folds(chips, f, 7, by="chip")[1] for f in range(7)]
    assert sorted(c.image.name for v in vals for c in v) == sorted(c.image.name for c in chips)
    with pytest.raises(UserError, match="fold=7"):
        split_folds(chips, 7)


# --- sampling: deterministic, resumable order and augmentation ---------------------------------------


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_in_place():
    d = Dist()
    sampler = EpochBatches(10, 3, seed=5, d=d)
    it = iter(sampler)
    batches = [next(it) for _ in range(7)]  # 3 batches per epoch: epochs 0, 1 and the first of 2
    assert [b[0][0] for b in batches] == [0, 0, 0, 1, 1, 1, 2]
    assert sorted(i for b in batches[:3] for _, i in b) == sorted(sampler.indices(0)[:9])
    assert sampler.indices(0) != sampler.indices(1)
    resumed = iter(EpochBatches(10, 3, seed=5, d=d, start=4))
    assert [next(resumed) for _ in range(3)] == batches[4:7]


def test_two_processes_see_the_same_global_batches_as_one():
    one = iter(EpochBatches(12, 4, seed=1, d=Dist()))
    ranks = [iter(EpochBatches(12, 2, seed=1, d=Dist(r, 2))) for r in (0, 1)]
    for _ in range(6):
        single = sorted(next(one))
        split = sorted(next(ranks[0]) + next(ranks[1]))
        assert single == split


def test_balanced_sampling_draws_empty_sparse_and_dense_chips_equally():
    fractions = np.array([0.0] * 2 + [0.01, 0.02, 0.03, 0.04] + [0.5] * 14)
    weights = balanced_weights(fractions)
    bins = np.where(fractions == 0, 0, np.where(fractions < np.median(fractions[fractions > 0]), 1, 2))
    assert [weights[bins == b].sum() for b in range(3)] == pytest.approx([1 / 3] * 3)
    sampler = EpochBatches(len(fractions), 10, seed=0, d=Dist(), weights=weights)
    drawn = [i for e in range(150) for i in sampler.indices(e)]
    share = np.bincount(bins[drawn], minlength=3) / len(drawn)
    assert share == pytest.approx([1 / 3] * 3, abs=0.03)


def test_building_fractions_read_the_masks_and_count_maskless_chips_as_empty(chips_dir):
    fractions = dataset.building_fractions(list_chips(chips_dir))
    assert fractions == pytest.approx([200 / (48 * 64), 0.0, 100 / (48 * 64), 100 / (48 * 64)])  # 128 counts


def test_reseeded_augmentations_are_reproducible_and_independent():
    tf = train_transform(64, level="light")
    img = np.arange(96 * 96 * 3, dtype=np.uint8).reshape(96, 96, 3)
    mask = np.zeros((96, 96), np.uint8)

    def apply(words):
        seed_transform(tf, words)
        return tf(image=img, mask=mask, valid=mask)["image"]

    assert np.array_equal(apply([0, 0, 3, 7]), apply([0, 0, 3, 7]))
    outcomes = set()
    for k in range(40):  # horizontal and vertical flips must not always fire together
        seed_transform(tf, [k])
        flips = [t for t in tf.transforms if type(t).__name__ in ("HorizontalFlip", "VerticalFlip")]
        outcomes.add(tuple(t.py_random.random() < 0.5 for t in flips))
    assert len(outcomes) == 4


def test_seeded_items_augment_by_epoch_and_index_not_by_call_order(chips_dir):
    items = dataset.SeededItems(ChipDataset(list_chips(chips_dir)[:3], train_transform(32, level="light")), 0, 0)
    first = items[(1, 2)]["image"]
    items[(0, 0)]
    assert torch.equal(items[(1, 2)]["image"], first)


def test_load_data_splits_by_scene_and_refuses_too_few_chips_for_a_batch(make_chips, tmp_path):
    root = make_chips(tmp_path / "chips")
    cfg = compose_config("train", [f"data_dir={root}", "num_folds=2", "batch_size=2", "width=64"])
    data = dataset.load_data(cfg, Dist())
    assert {c.scene for c in data.train}.isdisjoint({c.scene for c in data.val})
    assert data.train_gsd == pytest.approx(0.1) and data.soft_set is None
    with pytest.raises(UserError, match="lower batch_size"):
        dataset.load_data(compose_config("train", [f"data_dir={root}", "num_folds=2", "batch_size=4"]), Dist(0, 2))


@pytest.mark.slow
def test_cli_unreadable_scene_is_one_short_line_others_written_and_exit_1(tmp_path):
    make_pair(tmp_path / "d", "a")
    _, labels = make_pair(tmp_path / "d", "b")
    labels.write_text("hello")
    cmd = [sys.executable, str(REPO_DIR / "dataset.py"), "base_dir=d", "out_dir=out", "progress=false"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    scene_line = ("error: d/labels/b.geojson: not a readable vector file (not recognized as a supported file "
                  "format) (scene skipped)")
    summary_line = ("error: 1 scene(s) could not be read and were skipped (listed above); fix them and rerun: "
                    "chips already written are kept")
    assert result.stderr.splitlines() == [scene_line, summary_line]
    assert result.stdout.startswith("1 chips written (1 with buildings)")
    assert [p.name for p in (tmp_path / "out" / "d").iterdir()] == ["a"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the 16 cores are faked; none is started
def test_num_workers_auto_loads_in_two_processes_on_the_cpu_and_more_beside_a_gpu(monkeypatch):
    """train.yaml's num_workers=auto: 2 loader processes with the model on the CPU, this process's cores but
    one beside a GPU (pinned memory there); a given count is kept. No loader is iterated: forking worker
    processes inside a test worker is left to the training tests' subprocesses."""
    from lib.distributed import Dist

    cfg = compose_config("train", ["num_workers=auto"])
    sampler = dataset.EpochBatches(8, 2, 0, Dist())
    items = list(range(8))
    cpu = dataset.make_loader(items, cfg, sampler, torch.device("cpu"))
    assert (cpu.num_workers, cpu.persistent_workers, cpu.pin_memory) == (2, True, False)
    monkeypatch.setattr("lib.devices.os.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    gpu = dataset.make_loader(items, cfg, sampler, torch.device("cuda"))
    assert (gpu.num_workers, gpu.pin_memory) == (8, True)
    cfg.num_workers = 3
    assert dataset.make_loader(items, cfg, sampler, torch.device("cuda")).num_workers == 3
    cfg.num_workers = 0
    assert dataset.make_loader(items, cfg, sampler, torch.device("cuda")).num_workers == 0
