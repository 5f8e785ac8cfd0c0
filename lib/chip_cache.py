"""Decoded training chips kept in memory between visits (train.py's `chip_cache_mb`)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class DecodedChips:
    """The decoded arrays of recently read chips, least recently used dropped first, at most `budget_mb`.

    A short run revisits each chip dozens of times (the documented Kampala run: 65 chips, 3,200 samples),
    and decoding its JPEG and three PNGs was about half of a sample's loading time. The loader's workers
    share the training process's two cores with the model, so every millisecond saved there goes to the
    model. Each worker process keeps its own copy; the arrays are read-only, so a transform that tried to
    change one in place would fail loudly instead of corrupting later samples.
    """

    def __init__(self, budget_mb: float):
        self.budget = int(float(budget_mb) * 2**20)
        self.used = 0
        self._items: OrderedDict[int, tuple[dict, int]] = OrderedDict()  # key -> (arrays, bytes)

    def get(self, key: int) -> dict | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: int, raw: dict) -> None:
        arrays = [v for v in raw.values() if isinstance(v, np.ndarray)]
        size = sum(v.nbytes for v in arrays)
        if size > self.budget:
            return
        for v in arrays:
            v.setflags(write=False)
        while self.used + size > self.budget:
            self.used -= self._items.popitem(last=False)[1][1]
        self._items[key] = (raw, size)
        self.used += size
