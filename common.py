"""Plumbing shared by every command-line script.

One exception type for mistakes a user can fix (`UserError`), atomic file writing, the Hydra entry
point that prints such mistakes as one line (no traceback) and exits non-zero, and the locations of
the shared test data and the built-in demo scene.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
CONFIG_DIR = REPO_DIR / "config"
VERSION = "0.1.0"


class UserError(Exception):
    """A problem with the user's input: the message is one line naming the file and the fix."""


def shared_dir() -> Path:
    """Real test data lives beside the checkout (`../shared`), or where `SHARED_DIR` points."""
    return Path(os.environ.get("SHARED_DIR", REPO_DIR.parent / "shared")).resolve()


def demo_dir() -> Path:
    """Where the built-in synthetic demo scene is generated (`BUILDINGS_DEMO_DIR` overrides)."""
    return Path(os.environ.get("BUILDINGS_DEMO_DIR", REPO_DIR / "data" / "demo")).resolve()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    Readers never see a half-written file, and an interrupted run leaves nothing at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp creates 0600; give the file the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically, pretty-printed so users can read it."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def cli(config_name: str) -> Callable:
    """Decorate a script's `main(cfg)` as a Hydra 1.3 entry point on `config/<config_name>.yaml`.

    Hydra does not change the working directory (relative paths mean what the user typed), and a
    `UserError` raised anywhere below is printed as `error: <message>` with exit status 2.
    """
    import hydra

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(cfg):
            try:
                return fn(cfg)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(130)

        return hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(guarded)

    return decorate


def compose_config(config_name: str, overrides: list[str] | None = None):
    """Compose a script's config exactly as its CLI would (used by tests and by other scripts)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def resolve_device(name: str = "auto"):
    """Map `device=auto|cpu|cuda|cuda:N|mps` to a torch.device, failing clearly if unavailable."""
    import torch

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    return dev


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar that stays readable in log files: refreshed every 30 s when stderr is not a terminal
    (a terminal gets tqdm's usual live bar)."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
