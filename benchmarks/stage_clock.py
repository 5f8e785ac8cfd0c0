"""Where inference.py's CPU goes besides the model, stage by stage, and what its serial stages allow.

Used by bench_inference.py's section 2 while the model's recorded outputs are replayed (no model at all).
Beside the model, a folder run spreads its work over threads: reader threads read and resize windows,
one thread per image writes its blocks and polygonizes them, worker threads finish images (COGs,
footprints, STAC items; `finish_workers` threads), and reading and writing raster blocks take one lock
(lib.geo_io.GDAL_LOCK). On a 2-core CPU the model takes the cores and these never limit it; on an
accelerator's many-core host the model is so much faster that a serial stage can: a stage that n
threads run cannot go faster than n / (its CPU seconds per image) images/s, and nothing can go faster
than 1 / (seconds the lock is held per image). The GIL is not counted, so these are upper bounds.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import time
from collections import defaultdict

# (label, module, attribute): the functions whose thread CPU is summed; each runs in its own thread kind
STAGES = (
    ("reading and resizing (reader threads)", "lib.tiling", "Engine._prepare"),
    ("writing and polygonizing blocks (a thread per image)", "lib.raster_outputs", "SceneWriter.add"),
)
FINISH_STAGE = "finishing images: COGs, footprints, STAC (finish_workers threads)"
MAIN_STAGE = "the model loop without the model (main thread)"
LOCK_STAGE = "GDAL lock held (wall seconds)"
OTHER_STAGE = "the rest: torch's thread pool working for the main loop, planning the next image, other threads"
_ON_MAIN = "stages run on the main thread"  # e.g. reading with num_workers=0: not counted twice


class _TimedLock:
    """A stand-in for an RLock that sums the wall seconds it is held (outermost acquire to release)."""

    def __init__(self, lock, clock) -> None:
        self.lock, self.clock, self.local = lock, clock, threading.local()

    def __enter__(self):
        self.lock.acquire()
        depth = getattr(self.local, "depth", 0)
        if depth == 0:
            self.local.start = time.perf_counter()
        self.local.depth = depth + 1
        return self

    def __exit__(self, *exc) -> None:
        self.local.depth -= 1
        if self.local.depth == 0:
            self.clock.add(LOCK_STAGE, time.perf_counter() - self.local.start)
        self.lock.release()


class StageClock:
    """Thread CPU seconds per stage (and the lock's held seconds) over one run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._guard = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        with self._guard:
            self.seconds[key] += seconds

    def timed(self, key: str, f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                self.add(key, spent)
                if threading.current_thread() is threading.main_thread():  # not the main loop's own
                    self.add(_ON_MAIN, spent)
        return wrapper

    @contextlib.contextmanager
    def watching(self, inference_module):
        """Time the stages while the block runs (the main thread's CPU too); everything is put back after."""
        from lib import geo_io

        undo = [(geo_io, "GDAL_LOCK", geo_io.GDAL_LOCK)]
        for label, module, attribute in STAGES:
            owner, name = importlib.import_module(module), attribute
            if "." in attribute:
                cls, name = attribute.split(".")
                owner = getattr(owner, cls)
            undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, self.timed(label, getattr(owner, name)))
        start_image = inference_module.start_image

        def timed_start(*args, **kwargs):  # the half run on the main thread returns the finishing half
            return self.timed(FINISH_STAGE, start_image(*args, **kwargs))

        undo.append((inference_module, "start_image", start_image))
        inference_module.start_image = timed_start
        geo_io.GDAL_LOCK = _TimedLock(geo_io.GDAL_LOCK, self)
        main, process = time.thread_time(), time.process_time()
        try:
            yield self
        finally:
            self.add(MAIN_STAGE, time.thread_time() - main - self.seconds.pop(_ON_MAIN, 0.0))
            counted = sum(v for k, v in self.seconds.items() if k != LOCK_STAGE)
            self.add(OTHER_STAGE, max(0.0, time.process_time() - process - counted))
            for owner, name, value in reversed(undo):
                setattr(owner, name, value)

    def per_image(self, images: int) -> dict[str, float]:
        """Seconds per image by stage: the CPU stages (they add up to the run's CPU), then the lock."""
        order = [label for label, _, _ in STAGES] + [FINISH_STAGE, MAIN_STAGE, OTHER_STAGE, LOCK_STAGE]
        return {k: self.seconds[k] / images for k in order if k in self.seconds}

    def serial_limits(self, images: int, finish_workers: int = 1) -> dict[str, float]:
        """Images/s that each serial stage allows at most: its threads over its seconds per image."""
        per = self.per_image(images)
        threads = {FINISH_STAGE: finish_workers, MAIN_STAGE: 1, LOCK_STAGE: 1}
        return {k: n / per[k] for k, n in threads.items() if per.get(k, 0) > 0}
