"""Exported CircleNet ensembles: models x TTA averaged into the point heads, in one traced graph.

`PointEnsembleTTA` is lib.exported's EnsembleTTA for the point task, so tracing, the parity check,
provenance, writing and reading back are lib.exported's code. The graph takes what the engine feeds a
CircleNet (`PointDecoder.prepare_input`: the SAR source's uint8 windows / 255, float [N, C, H, W], H and
W multiples of 32) and returns, at stride 2 (lib.point_contract), averaged over every model x TTA
transform with each transform undone:

    objectness_prob  [N, 1, H/2, W/2]  mean of sigmoid(objectness)
    length           [N, 1, H/2, W/2]  mean length in input pixels
    offset           [N, 2, H/2, W/2]  mean (dy, dx) in output cells, signs and order undone per transform
                                       as the engine does (lib.tta.tta_inverse_vectors; `inverse_offsets`)
    vessel_prob      [N, 1, H/2, W/2]  mean of sigmoid(vessel)
    fishing_prob     [N, 1, H/2, W/2]  mean of sigmoid(fishing)

Probabilities are averaged, not logits, because that is what the engine averages over its own TTA and
models (PointDecoder applies the sigmoid before blending): an export with TTA baked in and the engine
running the same TTA on the eager models give the same maps. The file records "task": "points", the
"heads" that lib.exported.ExportedModel turns back into the point_contract.HEADS dict (probabilities
become logits again, so PointDecoder decodes an export like a CircleNet), and under "meta" what
point inference reads from a checkpoint: the SAR channels and normalisation (`sar`), the tuned
thresholds (`postprocess`), the training chip width and GSD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lib import point_contract as pc
from lib.errors import UserError
from lib.exported import EnsembleTTA
from lib.point_decoding import PointDecoder
from lib.tta import tta_inverse

TASK = "points"
# (graph output, point_contract head, how ExportedModel turns it back into the head)
HEADS = (("objectness_prob", pc.OBJECTNESS, "sigmoid"), ("length", pc.LENGTH, "identity"),
         ("offset", pc.OFFSET, "identity"), ("vessel_prob", pc.VESSEL, "sigmoid"),
         ("fishing_prob", pc.FISHING, "sigmoid"))
OUTPUT_NAMES = tuple(name for name, _, _ in HEADS)
OFFSET_INDEX = OUTPUT_NAMES.index("offset")
OUTPUTS = {
    "objectness_prob": "float32 [N, 1, H/2, W/2]: probability that an object's centre lies in the cell, mean over "
                       "models x TTA of sigmoid(objectness) with each transform undone",
    "length": "float32 [N, 1, H/2, W/2]: object length in input pixels, mean over models x TTA",
    "offset": "float32 [N, 2, H/2, W/2]: (dy, dx) in output cells from the cell's reference point to the object, "
              "mean over models x TTA with each transform's signs and order undone",
    "vessel_prob": "float32 [N, 1, H/2, W/2]: vessel probability, mean over models x TTA of sigmoid(vessel)",
    "fishing_prob": "float32 [N, 1, H/2, W/2]: fishing probability, mean over models x TTA of sigmoid(fishing)",
}
INPUT = ("float32 [N, C, H, W], H and W multiples of 32: the SAR channels as normalised uint8 (0 = nodata) "
         "divided by 255 (lib.point_decoding.PointDecoder.prepare_input)")
OUTPUT_AXES = {name: {0: "batch", 2: "height_2", 3: "width_2"} for name in OUTPUT_NAMES}
GSD_KEYS = ("gsd", "ref_scale", "train_gsd")  # lib.tiling.model_gsd's keys


class PointEnsembleTTA(EnsembleTTA):
    """CircleNet models x TTA averaged into the five point heads (module docstring)."""

    task = TASK
    input_description = INPUT
    output_names = OUTPUT_NAMES
    outputs = OUTPUTS
    output_stride = pc.OUTPUT_STRIDE
    output_axes = OUTPUT_AXES
    spatial = (True,) * len(OUTPUT_NAMES)

    def __init__(self, models: Sequence[nn.Module], tta: Sequence[str] | str = ("none",), batch_tta: bool = True):
        super().__init__(models, tta, batch_tta)
        others = [i for i, m in enumerate(self.models) if (getattr(m, "config", None) or {}).get("task") != TASK]
        if others:
            raise UserError(f"model=[...]: model {others[0] + 1} is not a point-detection (CircleNet) network")
        self.inference_meta = inference_meta([getattr(m, "meta", None) or {} for m in self.models])

    def model_input(self, image: torch.Tensor) -> torch.Tensor:
        return PointDecoder().prepare_input(image)

    def head_probabilities(self, out: dict) -> list[torch.Tensor]:
        return [torch.sigmoid(out[pc.OBJECTNESS]), out[pc.LENGTH], out[pc.OFFSET],
                torch.sigmoid(out[pc.VESSEL]), torch.sigmoid(out[pc.FISHING])]

    def undo(self, index: int, y: torch.Tensor, name: str) -> torch.Tensor:
        y = tta_inverse(y, name)
        return inverse_offsets(y, name) if index == OFFSET_INDEX else y

    def task_meta(self) -> dict:
        return {"task": TASK, "heads": [list(h) for h in HEADS], "meta": self.inference_meta}


def inverse_offsets(y: torch.Tensor, name: str) -> torch.Tensor:
    """lib.tta.tta_inverse_vectors(y, name, ((0, 1),)) for an offset map [N, 2, h, w] (dy, dx), as a
    traceable expression: that function assigns channels in place, which a traced graph replays with
    the traced sizes baked in. Negating dx undoes an hflip, dy a vflip, and swapping them a transpose
    (applied first, so undone last); tests check both give the same numbers for every transform."""
    flip = name[len("transpose"):].lstrip("_") if name.startswith("transpose") else name
    dy, dx = y[:, 0:1], y[:, 1:2]
    if flip in ("hflip", "hvflip"):
        dx = -dx
    if flip in ("vflip", "hvflip"):
        dy = -dy
    if name.startswith("transpose"):
        dy, dx = dx, dy
    return torch.cat([dy, dx], 1)


def inference_meta(metas: Sequence[dict]) -> dict:
    """What point inference reads from a checkpoint's meta, for the whole ensemble.

    The SAR channels and normalisation must be one for all models (they see one input); the tuned
    thresholds come from the first model, as inference takes them from the first checkpoint; the
    training width and GSD are kept where the models agree. The GSD falls back to the SAR scenes' GSD.
    """
    sars = [m.get("sar") for m in metas]
    if any(s != sars[0] for s in sars[1:]):
        raise UserError("model=[...]: the checkpoints were trained on different SAR channels or normalisation "
                        f"({sars[0]} vs {next(s for s in sars if s != sars[0])}); an ensemble needs one input")
    out: dict = {"task": TASK}
    if sars[0]:
        out["sar"] = sars[0]
    if metas[0].get("postprocess"):
        out["postprocess"] = metas[0]["postprocess"]
    for key in ("width", *GSD_KEYS):
        values = [m.get(key) for m in metas]
        if values[0] is not None and all(v == values[0] for v in values):
            out[key] = values[0]
    if not any(k in out for k in GSD_KEYS) and (sars[0] or {}).get("gsd"):
        out["gsd"] = sars[0]["gsd"]
    return out
