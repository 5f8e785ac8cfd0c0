"""When the training loop validates: `val_every` = auto | N (steps) | "Ns" (seconds) | null (every epoch).

A validation (and the checkpoint it writes) stops training; on a small CPU with a small training set,
validating every epoch cost more than a third of the documented run. `auto` therefore measures: the
first validation comes at the end of epoch 1 or at step AUTO_FIRST_STEP, whichever is first; from the
seconds it took (validation + the checkpoint written with it) and the mean training step since the last
one, the next validations are `steps_between` steps apart, so that validation stays within VAL_SHARE of
the training time; the figure is re-estimated after every validation. "Ns" converts N seconds into
steps with the measured step time (first estimated after PROBE_STEPS steps). The final step always
validates. Integer `val_every` and null keep their meaning (a fixed step count; null or 0: every epoch).

Timing differs between processes, so under torchrun rank 0's plan is broadcast (lib.distributed):
every rank validates at the same steps. The plan (`every`, `next_step`) is stored in training
checkpoints, so a resumed run validates where the uninterrupted one would have. Where validations
fall does not change the training trajectory (validation touches neither the weights nor any RNG).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lib.errors import UserError

VAL_SHARE = 0.05  # auto: validation at most this share of (training + validation) time
AUTO_FIRST_STEP = 50  # auto: the first validation, unless epoch 1 ends earlier
PROBE_STEPS = 5  # "Ns": steps timed before the first conversion of seconds into steps
SHRINK = 0.75  # auto: a re-estimate shorter than this share of the current cadence replaces it
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*s\s*$")


def parse_val_every(value) -> tuple[str, float | None]:
    """("epoch", None) | ("auto", None) | ("steps", N) | ("seconds", T) from the config value."""
    if value is None or str(value).strip() == "0":  # 0 meant every epoch too, before auto
        return "epoch", None
    text = str(value).strip()
    if text == "auto":
        return "auto", None
    if text.isdigit() and int(text) >= 1:
        return "steps", int(text)
    match = _SECONDS.match(text)
    if match and float(match.group(1)) > 0:
        return "seconds", float(match.group(1))
    raise UserError(f"val_every={value}: use auto, a number of steps (e.g. 100), seconds (e.g. 300s) or null "
                    "(every epoch)")


def steps_between(val_s: float, step_s: float, share: float = VAL_SHARE) -> int:
    """Fewest steps between validations for which validation is at most `share` of the time:
    val_s <= share * (N * step_s + val_s), i.e. N >= (1 - share) / share * val_s / step_s (19x at 5 %)."""
    need = (1.0 - share) / share * val_s / max(step_s, 1e-9)
    return max(1, math.ceil(need - 1e-9))


def val_share(every: int, val_s: float, step_s: float) -> float:
    """Share of the time spent validating when validating every `every` steps."""
    return val_s / max(every * step_s + val_s, 1e-9)


@dataclass
class Cadence:
    """The validation schedule of one run; `due(step)` after each optimiser step."""

    mode: str
    value: float | None
    per_epoch: int
    total: int
    every: int | None = None  # steps between validations (fixed, or the current auto/seconds plan)
    next_step: int | None = None  # auto / seconds: the step of the next validation (None: not planned yet)

    @classmethod
    def from_config(cls, val_every, per_epoch: int, total: int) -> Cadence:
        mode, value = parse_val_every(val_every)
        c = cls(mode, value, max(int(per_epoch), 1), int(total))
        if mode == "steps":
            c.every = int(value)
        elif mode == "epoch":
            c.every = c.per_epoch
        elif mode == "auto":
            c.next_step = min(c.per_epoch, AUTO_FIRST_STEP)
        return c

    @property
    def adaptive(self) -> bool:
        return self.mode in ("auto", "seconds")

    def due(self, step: int) -> bool:
        if step >= self.total:
            return True
        if not self.adaptive:
            return step % self.every == 0
        return self.next_step is not None and step >= self.next_step

    def probe_due(self, step: int) -> bool:
        """Seconds mode: the step at which the first plan is made (without a validation)."""
        return self.mode == "seconds" and self.next_step is None and step >= PROBE_STEPS

    def plan(self, step: int, step_s: float, val_s: float | None) -> bool:
        """Set `every` and `next_step` from the measured seconds; returns whether `every` changed."""
        if self.mode == "seconds":
            new = max(1, round(self.value / max(step_s, 1e-9)))
        else:
            new = steps_between(val_s, step_s)
            if self.every is not None and SHRINK * self.every <= new <= self.every:
                new = self.every  # within budget and not much shorter: keep (no jitter in the schedule)
        changed = new != self.every
        self.every = new
        self.next_step = max(step + 1, new if self.mode == "seconds" and val_s is None else step + new)
        return changed

    def describe(self, step_s: float, val_s: float | None) -> str:
        """The line printed when the cadence is chosen or changes."""
        if self.mode == "seconds":
            return f"validation every {self.every} steps (val_every={self.value:g}s, step {step_s:.2f} s)"
        return (f"validation every {self.every} steps (val {val_s:.1f} s, step {step_s:.2f} s: "
                f"{100 * val_share(self.every, val_s, step_s):.0f} % of training)")

    def state(self) -> dict:
        return {"every": self.every, "next_step": self.next_step}

    def load(self, state: dict | None) -> None:
        """Continue a saved plan (checkpoints of adaptive runs); fixed cadences need nothing."""
        if state and self.adaptive:
            self.every, self.next_step = state.get("every"), state.get("next_step")
