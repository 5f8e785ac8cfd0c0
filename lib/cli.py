"""The command-line plumbing every script shares.

The Hydra entry point that prints a user's mistake as one line (no traceback) and exits non-zero,
composing a script's config the way its CLI would, progress bars that stay readable in logs, and
where the project, its config, the shared test data and the built-in demo scene live.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lib.errors import UserError

REPO_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_DIR / "config"
VERSION = "0.1.0"


def shared_dir() -> Path:
    """Real test data lives beside the checkout (`../shared`), or where `SHARED_DIR` points."""
    return Path(os.environ.get("SHARED_DIR", REPO_DIR.parent / "shared")).resolve()


def demo_dir() -> Path:
    """Where the built-in synthetic demo scene is generated (`BUILDINGS_DEMO_DIR` overrides)."""
    return Path(os.environ.get("BUILDINGS_DEMO_DIR", REPO_DIR / "data" / "demo")).resolve()


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


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar that stays readable in log files: refreshed every 30 s when stderr is not a terminal
    (a terminal gets tqdm's usual live bar)."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
