"""lib.instance_targets (border and contact maps from instance ids) and how training chips carry the ids:
through every augmentation exactly, and derived from the mask for chips prepared without instance files."""

import cv2
import numpy as np
import pytest
import torch

import dataset
from lib.cli import compose_config
from lib.distributed import Dist
from lib.instance_targets import ids_from_mask, instance_targets, widths_px


def brute_force(ids: np.ndarray, border_px: int, contact_px: int):
    """The definition, pixel by pixel: the ids inside the elliptical window around each pixel."""
    def near(y, x, r):
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)).astype(bool)
        y0, x0 = y - r, x - r
        ys, xs = np.nonzero(k)
        ys, xs = ys + y0, xs + x0
        keep = (ys >= 0) & (ys < ids.shape[0]) & (xs >= 0) & (xs < ids.shape[1])
        return set(ids[ys[keep], xs[keep]].tolist())

    border, contact = np.zeros(ids.shape, np.float32), np.zeros(ids.shape, np.float32)
    for y, x in np.ndindex(ids.shape):
        if ids[y, x]:
            border[y, x] = len(near(y, x, border_px)) > 1
        else:
            contact[y, x] = len(near(y, x, contact_px) - {0}) > 1
    return border, contact


def scene() -> np.ndarray:
    ids = np.zeros((40, 60), np.uint16)
    ids[10:30, 5:20] = 1  # A
    ids[15:35, 22:37] = 2  # B, a 2 px gap (columns 20-21) from A, shifted 5 rows down
    ids[2:12, 48:58] = 3  # C, isolated
    return ids


def test_contact_lies_between_two_buildings_only_where_both_are_within_reach():
    ids = scene()
    border, contact = instance_targets(ids, 2, 3)
    assert border.dtype == contact.dtype == np.float32
    assert contact[15:30, 20:22].all()  # the gap where A and B face each other
    assert contact[10, 20:22].sum() == 0  # A's top rows: B starts 5 rows lower, out of reach
    assert contact[ids > 0].sum() == 0 and contact[:, 40:].sum() == 0  # never on roofs, nothing around C
    expected_border, expected_contact = brute_force(ids, 2, 3)
    np.testing.assert_array_equal(contact, expected_contact)
    np.testing.assert_array_equal(border, expected_border)


def test_border_is_a_band_of_border_px_inside_each_building_and_the_chip_edge_is_no_border():
    ids = np.zeros((40, 40), np.uint16)
    ids[10:30, 10:30] = 7
    ids[34:40, 0:6] = 9  # touches the bottom and left chip edges
    border, contact = instance_targets(ids, 3, 2)
    assert border[20, 10:13].all() and border[20, 13:27].sum() == 0 and border[20, 27:30].all()
    assert border[39, 0:3].sum() == 0 and border[39, 3:6].all()  # bottom edge: only the band at its right
    assert border[ids == 0].sum() == 0
    assert contact.sum() == 0  # no two buildings within 2 px of one background pixel
    wide, _ = instance_targets(ids, 5, 2)
    assert wide[20, 10:15].all() and wide[20, 15] == 0


def test_touching_buildings_get_a_border_on_both_sides_of_the_shared_wall():
    ids = np.zeros((30, 30), np.int32)
    ids[5:25, 5:15] = 1
    ids[5:25, 15:25] = 2  # shares the wall between columns 14 and 15
    border, contact = instance_targets(ids, 2, 2)
    assert border[15, 13:17].all() and border[15, 8:12].sum() == 0 and border[15, 18:22].sum() == 0
    assert contact[ids > 0].sum() == 0 and contact[4, 14:16].all()  # the wall's ends, outside both roofs
    big = ids * 40_000  # ids past uint16 still work (exact float morphology)
    np.testing.assert_array_equal(instance_targets(big, 2, 2)[0], border)


def test_widths_are_metres_at_the_chip_gsd_else_pixels_and_at_least_one():
    assert widths_px(0.1, 0.5, 1.0, 3, 6) == (5, 10)
    assert widths_px(None, 0.5, 1.0, 3, 6) == (3, 6)
    assert widths_px(10.0, 0.5, 1.0, 3, 6) == (1, 1)
    assert widths_px(None, 0.5, 1.0, None, None) is None


def always(transform):
    """The same pipeline with every transform forced on (p=1)."""
    for t in transform.transforms:
        t.p = 1.0
    return transform


def test_uint16_ids_survive_every_transform_of_the_seed_chain_exactly():
    ids = np.zeros((200, 200), np.uint16)
    values = [1, 2, 7, 100, 254, 255, 256, 257, 300, 511, 512, 1000, 4095, 4096, 12345, 20000, 32767, 32768,
              40000, 50000, 60000, 65000, 65533, 65534, 65535]  # around every byte boundary, up to uint16's max
    for k, (y, x) in enumerate(np.ndindex(5, 5)):
        ids[y * 40 + 2:y * 40 + 38, x * 40 + 2:x * 40 + 40] = values[k]
    mask = (ids > 0).astype(np.uint8) * 255
    image = np.dstack([mask, mask // 2, np.full_like(mask, 90)])
    valid = np.full(ids.shape, 255, np.uint8)
    pipelines = [always(dataset.train_transform(128, "seed", transpose=True)),
                 dataset.train_transform(128, "seed"), dataset.train_transform(128, "light"), dataset.val_transform(128)]
    names = {type(t).__name__ for t in pipelines[0].transforms}
    assert {"Affine", "GridDistortion", "OpticalDistortion", "CoarseDropout", "Transpose"} <= names
    for transform in pipelines:
        for seed in range(8):
            dataset.seed_transform(transform, [seed])
            out = transform(image=image, mask=mask, valid=valid, instances=ids)
            got = out["instances"]
            assert got.dtype == np.uint16 and got.shape == (128, 128)
            assert set(np.unique(got).tolist()) <= set(np.unique(ids).tolist())  # no mixed or clipped values
            assert np.array_equal(got > 0, out["mask"] > 127)  # ids move exactly with the mask
    np.testing.assert_array_equal(got, ids[36:164, 36:164])  # the last pipeline: a plain centre crop


def write_chip(folder, name, ids, with_instances=True):
    folder.mkdir(parents=True, exist_ok=True)
    image = np.where(ids[..., None] > 0, 200, 80).astype(np.uint8).repeat(3, axis=2)
    cv2.imwrite(str(folder / f"{name}.png"), image)
    cv2.imwrite(str(folder / f"{name}_mask.png"), (ids > 0).astype(np.uint8) * 255)
    if with_instances:
        cv2.imwrite(str(folder / f"{name}_instances.png"), ids.astype(np.uint16))


def test_chips_carry_ids_and_targets_and_older_chips_fall_back_to_mask_components(tmp_path):
    ids = np.zeros((64, 64), np.uint16)
    ids[10:40, 10:30] = 1
    ids[10:40, 30:50] = 2  # touching: one blob in the mask
    write_chip(tmp_path / "c" / "new", "1_0", ids)
    write_chip(tmp_path / "c" / "old", "1_0", ids, with_instances=False)
    chips = dataset.list_chips(tmp_path)
    assert [c.instances is not None for c in chips] == [True, False]  # and no instances.png listed as an image
    ds = dataset.ChipDataset(chips, dataset.val_transform(64), border_m=0.5, contact_m=1.0, border_px=2, contact_px=3)
    new, old = ds[0], ds[1]
    assert new["instances"].dtype == torch.int32 and new["instance_ok"].item() == 1.0
    assert torch.equal(new["instances"], torch.from_numpy(ids.astype(np.int32)))
    assert new["border"][20, 28:32].eq(1).all() and new["border"][20, 14:26].eq(0).all()  # the shared wall
    assert old["instance_ok"].item() == 0.0 and old["instances"].unique().tolist() == [0, 1]
    assert old["border"][20, 28:32].eq(0).all()  # the wall is unknown without ids
    assert ids_from_mask(np.where(ids > 0, 255, 0).astype(np.uint8)).max() == 1


def test_a_chip_folder_without_instance_files_still_loads_for_training_with_one_note(make_chips, tmp_path, capsys):
    root = make_chips(tmp_path / "chips", scenes=("a/s1", "a/s2", "a/s3"), per_scene=4, size=64)
    cfg = compose_config("train", [f"data_dir={root}", "num_folds=3", "batch_size=2", "width=64"])
    data = dataset.load_data(cfg, Dist())
    out = capsys.readouterr().out
    assert out.count("no instance masks") == 1
    assert f"note: {root}: chips have no instance masks (prepared by an older version); contact targets off" in out
    batch = torch.utils.data.default_collate([data.train_set[i] for i in range(2)])
    assert batch["instances"].shape == batch["border"].shape == batch["contact"].shape == (2, 64, 64)
    assert batch["instances"].dtype == torch.int32 and batch["instance_ok"].tolist() == [0.0, 0.0]
    item = data.val_set[0]
    assert item["border"].sum() > 0
    # widths from train.yaml in metres at the chips' 0.1 m/px (border_m=0.5 -> 5 px, contact_m=1.0 -> 10 px)
    assert (cfg.border_m, cfg.contact_m) == (0.5, 1.0)
    border, contact = instance_targets(item["instances"].numpy(), 5, 10)
    np.testing.assert_array_equal(item["border"].numpy(), border)
    np.testing.assert_array_equal(item["contact"].numpy(), contact)


@pytest.mark.parametrize("shape", [(64, 64), (64, 60)])
def test_an_instance_file_of_the_wrong_size_is_one_line_naming_it(tmp_path, shape):
    ids = np.zeros((64, 64), np.uint16)
    write_chip(tmp_path / "c" / "s", "1_0", ids)
    cv2.imwrite(str(tmp_path / "c" / "s" / "1_0_instances.png"), np.zeros(shape, np.uint16))
    ds = dataset.ChipDataset(dataset.list_chips(tmp_path), border_px=2, contact_px=3)
    if shape == (64, 64):
        assert ds[0]["instance_ok"].item() == 1.0
        return
    with pytest.raises(dataset.UserError, match=r"1_0_instances.png: instance mask is 60x64 but its image is 64x64"):
        ds[0]
