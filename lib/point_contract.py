"""What the point-detection task's pieces hand each other: output heads, target maps and their units.

CircleNet (circlenet.py) produces the heads, data preparation (lib.point_targets) encodes labels into
the target maps, the loss (lib.point_losses) compares the two, and the decoder (lib.point_decoding)
turns heads back into points. Naming every key once here keeps the four in step.

Geometry: the heads are at OUTPUT_STRIDE (2) of the model input; output cell (i, j) covers input
pixels [2i, 2i+2) x [2j, 2j+2), and its reference point is the input position (2i + 0.5, 2j + 0.5)
in pixel-centre coordinates, i.e. the centre of the cell. Point positions (rows, columns) are in
input pixels with pixel centres at integers (the xView3 `detect_scene_row/column` convention).
"""

from __future__ import annotations

OUTPUT_STRIDE = 2

# ----- model heads: dict keys of CircleNet's output, each [N, C, H/2, W/2] ----------------------
OBJECTNESS = "objectness"  # [N, 1] logits; sigmoid = probability that an object's centre is in the cell
LENGTH = "length"  # [N, 1] object length in input pixels (raw regression)
OFFSET = "offset"  # [N, 2] (dy, dx) in output cells from the cell's reference point to the object
VESSEL = "vessel"  # [N, 1] logits: is the object a vessel
FISHING = "fishing"  # [N, 1] logits: is the vessel fishing
HEADS = (OBJECTNESS, LENGTH, OFFSET, VESSEL, FISHING)

# ----- targets: dict keys of lib.point_targets.encode_targets, float32 at the heads' resolution ------
T_HEATMAP = "heatmap"  # [1] Gaussian of fixed radius, exactly 1 at each object's cell
T_VESSEL, T_VESSEL_W, T_VESSEL_UNKNOWN = "vessel", "vessel_weight", "vessel_unknown"  # [1] each
T_FISHING, T_FISHING_W, T_FISHING_UNKNOWN = "fishing", "fishing_weight", "fishing_unknown"  # [1] each
T_LENGTH, T_LENGTH_W = "length", "length_weight"  # [1] px (input pixels), weight 0 where unknown
T_OFFSET, T_OFFSET_W = "offset", "offset_weight"  # [2] (dy, dx) in output cells, [1] weight
T_VALID = "valid"  # [1] 1 where the input had data (nodata cells are ignored by every loss)
TARGETS = (T_HEATMAP, T_VESSEL, T_VESSEL_W, T_VESSEL_UNKNOWN, T_FISHING, T_FISHING_W, T_FISHING_UNKNOWN,
           T_LENGTH, T_LENGTH_W, T_OFFSET, T_OFFSET_W, T_VALID)

# ----- decoded maps: lib.point_decoding's names for the tiling engine (input-pixel units) ----------
M_OBJECTNESS, M_LENGTH, M_OFFSET_Y, M_OFFSET_X, M_VESSEL, M_FISHING = (
    "objectness", "length_px", "offset_y", "offset_x", "vessel", "fishing")
MAPS = (M_OBJECTNESS, M_LENGTH, M_OFFSET_Y, M_OFFSET_X, M_VESSEL, M_FISHING)

HEATMAP_RADIUS = 3  # output cells: the seed's fixed objectness radius
CLASS_RADIUS = 2  # output cells: classifier / length / offset weights fall from 1 at the centre to 0 here
