"""lib.chip_writer: grid windows cut like inference cuts a scene, batches of neighbouring chips, resolutions.json."""

import json

import pytest
from omegaconf import OmegaConf

from lib.chip_writer import ScenePlan, chip_batches, chip_scales, update_resolutions
from lib.errors import UserError
from lib.scene_sources import Scene
from lib.windows import window_offsets


def seed_grid_starts(n: int, tile: int, stride: int) -> list[int]:
    """The grid starts dataset.py computed before it used lib.windows (kept here as the reference)."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile] if not starts or starts[-1] != n - tile else starts


@pytest.mark.parametrize("n", [50, 100, 101, 300, 333, 1024, 5000])
@pytest.mark.parametrize("tile, stride", [(100, 100), (100, 50), (100, 1), (256, 200), (1024, 1024)])
def test_grid_windows_use_the_shared_window_offsets_with_identical_results(n, tile, stride):
    assert window_offsets(n, tile, tile - stride) == seed_grid_starts(n, tile, stride)


def test_scales_accept_one_value_or_a_list_and_refuse_non_positive_ones():
    assert chip_scales(OmegaConf.create({"scale": 2})) == [2.0]
    assert chip_scales(OmegaConf.create({"scale": [1, 0.5]})) == [1.0, 0.5]
    with pytest.raises(UserError, match="scale=0"):
        chip_scales(OmegaConf.create({"scale": 0}))


def plan(name: str, chips: list[tuple]) -> ScenePlan:
    return ScenePlan(Scene("c", name, None, None), [], None, False, 0.1, chips)


def test_batches_group_neighbouring_chips_of_one_scene_and_cap_the_total():
    chips = [(f"1_{i}", (i % 4) * 300, (i // 4) * 600, 256, 256, 1.0) for i in range(8)]
    plans = [plan("a", chips), plan("b", chips[:3])]
    cfg = OmegaConf.create({"shuffle": False, "seed": 0, "max_samples": None, "batch_chips": 4})
    batches = chip_batches(plans, cfg)
    assert [(i, len(specs)) for i, specs in batches] == [(0, 4), (0, 4), (1, 3)]
    assert [s[0] for s in batches[0][1]] == ["1_0", "1_1", "1_2", "1_3"]  # one 512 px strip first
    capped = chip_batches(plans, OmegaConf.merge(cfg, {"max_samples": 5}))
    assert sum(len(specs) for _, specs in capped) == 5


def test_resolutions_merge_with_an_existing_file_and_survive_a_corrupt_one(tmp_path):
    update_resolutions(tmp_path, {"c/a": 0.1234567})
    update_resolutions(tmp_path, {"c/b": 0.3})
    assert json.loads((tmp_path / "resolutions.json").read_text()) == {"c/a": 0.123457, "c/b": 0.3}
    (tmp_path / "resolutions.json").write_text("{not json")
    update_resolutions(tmp_path, {"c/a": 0.1})
    assert json.loads((tmp_path / "resolutions.json").read_text()) == {"c/a": 0.1}
