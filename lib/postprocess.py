"""How probability maps become footprints: the settings shared by inference, combining, tuning and validation.

A value given on the command line wins; otherwise the first model's tuned value
(`meta.postprocess`, written by `find_hyperparameters.py mode=postprocess`); otherwise the default
below. Keeping the resolution in one place means inference, `combine_images.py`, the tuner and
training's validation turn the same maps into the same polygons.

- `threshold`: building mask where the (averaged) probability >= threshold.
- `seed_threshold`: instance seeds where building x (1 - border) x (1 - contact) >= seed_threshold
  (models with the instance head); each seed grows back over the mask by watershed.
- `seed_min_area`: seeds smaller than this are dropped (m^2 with a CRS, px for plain images).
- `min_area`: footprints smaller than this are dropped (m^2 with a CRS, px for plain images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULTS = {"threshold": 0.5, "seed_threshold": 0.5, "seed_min_area": 1.0, "min_area": 4.0}
TUNED = ("threshold", "seed_threshold", "min_area")  # what mode=postprocess searches and stores
INSTANCE_MODES = ("auto", "true", "false")


@dataclass(frozen=True)
class PostProcess:
    threshold: float
    seed_threshold: float
    seed_min_area: float
    min_area: float

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(cfg, meta: dict | None = None) -> PostProcess:
    """Each setting from `cfg` when not null, else `meta["postprocess"]` (tuned), else DEFAULTS."""
    tuned = (meta or {}).get("postprocess") or {}
    values = {}
    for key, default in DEFAULTS.items():
        given = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
        values[key] = float(given if given is not None else tuned.get(key, default))
    return PostProcess(**values)


def instance_mode(value) -> str:
    """`instances=` as one of auto | true | false (YAML booleans accepted)."""
    text = str(value).lower()
    if text not in INSTANCE_MODES:
        from lib.errors import UserError

        raise UserError(f"instances={value}: use auto, true or false")
    return text
