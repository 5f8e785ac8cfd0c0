"""Shared fixtures: the real data beside the checkout and a small generated demo scene."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.cli import shared_dir

os.environ.setdefault("OMP_NUM_THREADS", "2")
# exports and backend trials of the tests' throw-away models go to a private cache, not the user's,
# removed when the session ends
if "BUILDINGS_CACHE" not in os.environ:
    os.environ["BUILDINGS_CACHE"] = tempfile.mkdtemp(prefix="buildings-test-cache-")
    atexit.register(shutil.rmtree, os.environ["BUILDINGS_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def shared() -> Path:
    """`../shared` (or $SHARED_DIR): real imagery, labels and reference vectors."""
    path = shared_dir()
    assert (path / "data").is_dir(), f"shared data not found at {path}; set SHARED_DIR"
    return path


@pytest.fixture(autouse=True)
def fixed_seeds():
    """Every test starts from the same random state, whichever tests ran before it in the worker."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """b0 checkpoints saved with save_checkpoint: random weights, an always-empty and an always-building one."""
    import torch

    import model as M
    from lib.checkpoints import save_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    net = M.build_model("efficientnet-b0", pretrained=False)
    save_checkpoint(d / "b0.pth", net, meta={"ref_scale": 0.1})
    out = {"b0": d / "b0.pth"}
    for name, sign in (("empty", -1.0), ("full", 1.0)):
        with torch.no_grad():
            net.seg_head.weight.zero_()
            net.seg_head.bias.copy_(torch.tensor([-10.0 * sign, 10.0 * sign]))
            net.image_heads.cls.weight.zero_()
            net.image_heads.cls.bias.copy_(torch.tensor([-10.0 * sign, 10.0 * sign]))
        save_checkpoint(d / f"{name}.pth", net)
        out[name] = d / f"{name}.pth"
    return out


@pytest.fixture
def drone(shared) -> Path:
    """A real georeferenced RGB drone orthophoto (576 x 923, EPSG:32632, no labels)."""
    return shared / "data" / "drone" / "drone.tif"


def _synthetic_chips(root: Path, scenes=("a/s1", "a/s2"), per_scene=6, size=128, seed=0) -> Path:
    """Chips like dataset.py writes them: textured ground with bright rectangular roofs, 0/255 masks, 0.1 m/px."""
    import json

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    for scene in scenes:
        folder = root / scene
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_scene):
            img = rng.integers(60, 110, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, size - 40, 2)
                h, w = rng.integers(16, 40, 2)
                img[y:y + h, x:x + w] = rng.integers(170, 250, 3)
                mask[y:y + h, x:x + w] = 255
            cv2.imwrite(str(folder / f"1_{i}.png"), img)
            cv2.imwrite(str(folder / f"1_{i}_mask.png"), mask)
    (root / "resolutions.json").write_text(json.dumps({s: 0.1 for s in scenes}))
    return root


@pytest.fixture
def make_chips():
    """`make_chips(root, scenes=..., per_scene=6, size=128, seed=0)`: synthetic training chips under `root`."""
    return _synthetic_chips


@pytest.fixture
def chips(tmp_path) -> Path:
    """Two scenes of six synthetic 128 px training chips (where only the training mechanics matter)."""
    return _synthetic_chips(tmp_path / "chips")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Export and parity tests compare graphs; one intra-op thread keeps them fast and deterministic."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
