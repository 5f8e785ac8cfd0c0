"""The command-line plumbing every script shares.

The Hydra entry point that prints a user's mistake as one line (no traceback) and exits non-zero,
the check that refuses command-line keys a script's config does not have, composing a script's config
the way its CLI would, progress bars that stay readable in logs, and where the project, its config, the
shared test data and the built-in demo scene live.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from lib.errors import UserError, one_line

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

    Hydra does not change the working directory (relative paths mean what the user typed), a
    `UserError` raised anywhere below is printed as `error: <message>` with exit status 2, and warnings
    are printed as one line, `warning: <message>`. The command line is checked first: a key the config
    lacks (`max_lrr=1`, `+newkey=1`) would otherwise fail with a Hydra traceback or, when appended, be
    silently ignored by the script.
    """
    import hydra

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(cfg):
            try:
                return fn(cfg)
            except UserError as err:
                _exit_with(err)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(130)

        hydra_main = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(guarded)

        @functools.wraps(fn)
        def entry(cfg=None):
            warnings.formatwarning = format_warning
            if cfg is None:
                try:
                    check_command_line(config_name, sys.argv[1:])
                except UserError as err:
                    _exit_with(err)
            return hydra_main(cfg)

        return entry

    return decorate


def format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one readable line, `warning: <message>`, without the file, line and source that
    Python adds (a user cannot act on them; the message says what to do)."""
    return f"warning: {' '.join(str(message).split())}\n"


def _exit_with(err: UserError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Check the overrides of a script's command line the way `hydra.main` will read it (`--cfg job`,
    `-m`, `--config-name` understood); flags that do not compose the config (`--help`) skip the check."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    skip = (args.help, args.hydra_help, args.info, args.shell_completion, args.experimental_rerun,
            args.config_dir, args.config_path)
    if any(skip):
        return
    check_overrides(args.config_name or config_name, args.overrides)


def check_overrides(config_name: str | None, overrides: list[str]) -> None:
    """Raise `UserError` for the first override naming a key the script's config does not have.

    Group selections (`arch=b2`, `+arch=b0`) and Hydra's own settings (`hydra.*`, `hydra/...`) are
    allowed; every other key must exist in the config composed with those selections. Appending a key
    (`+key=...`, `++key=...`) is refused because no script would read it, and removing one (`~key`)
    because every script reads all of its keys (`++key=...` on an existing key just sets it). Sweeps
    (`-m max_lr=1e-4,2e-4`) are checked by key.
    """
    from hydra.core.override_parser.types import OverrideType

    parsed = _parse_overrides(overrides)
    script = f"{config_name}.py" if config_name else "this config"
    selections = [o for o in parsed if _is_selection(o) and not o.is_sweep_override()]
    for override in selections:
        _check_option(override, script)
    cfg = _compose(config_name, [o.input_line for o in selections])
    for override in parsed:
        if _is_selection(override):
            continue
        key = override.key_or_group
        if not _has_key(cfg, key):
            raise UserError(f"unknown key '{key}' for {script}{_suggestion(key, cfg)}")
        if override.type == OverrideType.ADD:
            raise UserError(f"key '{key}' of {script} exists: set it without '+' ({override.input_line[1:]})")
        if override.type == OverrideType.DEL:
            raise UserError(f"key '{key}' of {script} cannot be removed (set {key}=null instead)")


def _parse_overrides(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException as err:
            raise UserError(f"cannot read the override '{text}': {one_line(err)}") from err
    return parsed


def _is_selection(override) -> bool:
    """A config group choice or a Hydra setting rather than one of the script's own keys."""
    key = override.key_or_group
    return key == "hydra" or key.startswith(("hydra.", "hydra/")) or (CONFIG_DIR / key).is_dir()


def _check_option(override, script: str) -> None:
    """`arch=b9`: name the group's options (Hydra's own message spans several lines)."""
    group = CONFIG_DIR / override.key_or_group
    if override.is_delete() or not group.is_dir():
        return
    options = sorted(p.stem for p in group.glob("*.yaml"))
    if str(override.value()) not in options:
        raise UserError(f"unknown {override.key_or_group} '{override.value()}' for {script} "
                        f"(choose from {', '.join(options)})")


def _has_key(cfg, key: str) -> bool:
    from omegaconf import OmegaConf

    missing = object()
    return OmegaConf.select(cfg, key, default=missing, throw_on_resolution_failure=False) is not missing


def _suggestion(key: str, cfg) -> str:
    """` (did you mean 'max_lr'?)` for a near miss among the config's keys and groups, else nothing."""
    groups = [p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "shared"]
    match = difflib.get_close_matches(key, [*map(str, cfg.keys()), *groups], n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _compose(config_name: str | None, overrides: list[str]):
    """Hydra's compose API on config/, its composition errors turned into one-line `UserError`s."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a running script (on config/): compose directly
            return compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(one_line(err)) from err


def compose_config(config_name: str | None, overrides: list[str] | None = None):
    """Compose a script's config exactly as its CLI would (used by tests and by other scripts), refusing
    unknown keys the same way: a `UserError` naming the key."""
    from hydra.core.override_parser.types import OverrideType

    overrides = list(overrides or [])
    if any(o.type != OverrideType.CHANGE and not _is_selection(o) for o in _parse_overrides(overrides)):
        check_overrides(config_name, overrides)  # Hydra would accept an appended key without complaint
    try:
        return _compose(config_name, overrides)
    except UserError:
        check_overrides(config_name, overrides)  # names the unknown key when that is what failed
        raise


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar that stays readable in log files: refreshed every 30 s when stderr is not a terminal
    (a terminal gets tqdm's usual live bar)."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
        # fixed miniters: with tqdm's dynamic miniters its monitor thread redraws a slow bar between updates
        kwargs.setdefault("miniters", 1)
    return tqdm(iterable, **kwargs)
