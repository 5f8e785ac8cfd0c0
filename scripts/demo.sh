#!/usr/bin/env bash
# Quickstart main job: set up .venv, then run the whole workflow on the built-in synthetic demo scene
# on CPU in a few minutes: data prep -> training (small b0) -> TTA sliding-window inference (ensemble of
# flips, transpose and two scales) -> polygons -> evaluation -> PNG overlay.
# Re-running skips finished stages; `rm -rf outputs/demo` starts again. DEMO_STAGES="1 2 3" adds
# the self-training stage (pseudo-labels of the test scene cut into 256 px soft-label chips, a b0
# student with Mish and context block from scratch), a few more CPU minutes.
# Settings as in scripts/pipeline.sh; the demo's defaults are below.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${DEMO_TASK:-segmentation}" = points ]; then exec scripts/demo_points.sh; fi  # the xView3 point task
scripts/setup_env.sh
export OUT=${OUT:-outputs/demo}
export PREP_SCALES=${PREP_SCALES:-1}
export B1_ARGS=${B1_ARGS:-"model_name=efficientnet-b0 pretrained=false max_steps=150 width=128 batch_size=8 val_every=75 num_workers=1 precision=fp32"}
export B2_ARGS=${B2_ARGS:-"model_name=efficientnet-b0 pretrained=false max_steps=100 width=128 batch_size=8 val_every=50 num_workers=1 precision=fp32"}
export B1_WIDTH=${B1_WIDTH:-512} B2_WIDTH=${B2_WIDTH:-448}
export INFER_ARGS=${INFER_ARGS:-"tile_size=512 overlap=64 precision=fp32"}
export SOFT_CHIP_SIZE=${SOFT_CHIP_SIZE:-256}
# shellcheck disable=SC2086
scripts/pipeline.sh ${DEMO_STAGES:-1 3}

PY=.venv/bin/python
DEMO_DIR=${BUILDINGS_DEMO_DIR:-data/demo}
for img in "$DEMO_DIR"/test/images/*.tif; do
  stem=$(basename "$img" .tif)
  [ -f "$OUT/final/footprints/$stem.geojson" ] || continue  # stage 3 not run (DEMO_STAGES without 3)
  "$PY" overlay.py image="$img" pred="$OUT/final/footprints/$stem.geojson" \
    gt="$DEMO_DIR/test/labels/$stem.geojson" output="$OUT/final/overlay_$stem.png"
done
echo
echo "Demo finished. Outputs:"
echo "  model checkpoints     $OUT/b1/{best,last}.pth"
if [ -f "$OUT/b2/best.pth" ]; then
  echo "  self-training         $OUT/soft_labels/ (soft labels), $OUT/b2/{best,last}.pth (student)"
fi
echo "  probability maps      $OUT/final/probabilities/"
echo "  building masks        $OUT/final/masks/"
echo "  footprints (GeoJSON)  $OUT/final/footprints/"
echo "  overlay (open it)     $OUT/final/overlay_*.png"
echo "  scores                $OUT/final/scores.json"
