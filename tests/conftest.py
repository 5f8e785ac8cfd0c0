"""Shared fixtures: the real data beside the checkout and a small generated demo scene."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.cli import shared_dir

os.environ.setdefault("OMP_NUM_THREADS", "2")


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
