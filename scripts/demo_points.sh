#!/usr/bin/env bash
# The point task's demo (DEMO_TASK=points bash scripts/demo.sh): synthetic Sentinel-1 scenes with vessels
# in the xView3 layout -> prepared scenes -> a short CircleNet training on CPU -> detections on a held-out
# scene (another seed, never seen in training or model selection) -> the xView3 metric -> overlay PNG.
# Re-running skips finished stages; `rm -rf outputs/demo_points` starts again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
PY=.venv/bin/python
OUT=${OUT:-outputs/demo_points}
TRAIN_ARGS=${TRAIN_ARGS:-"model_name=efficientnet-b0 pretrained=false max_steps=200 width=256 batch_size=8 val_every=100 num_workers=1"}
INFER_ARGS=${INFER_ARGS:-"tile_size=512 tta=[none,hflip]"}
DEMO_DIR=${BUILDINGS_DEMO_DIR:-data/demo}

"$PY" dataset.py task=points progress=false                          # the demo scenes, prepared
TEST_ROOT=$("$PY" -m lib.sar_demo)                                    # the held-out scene
TEST_SCENE=$(ls -d "$TEST_ROOT"/sar1_*/ | head -1); TEST_SCENE=${TEST_SCENE%/}
if [ ! -f "$OUT/train/best.pth" ]; then
  # shellcheck disable=SC2086
  "$PY" train.py task=points output_dir="$OUT/train" $TRAIN_ARGS
fi
# shellcheck disable=SC2086
"$PY" inference.py task=points data_dir="$TEST_SCENE" model="$OUT/train/best.pth" output_dir="$OUT/test" $INFER_ARGS
"$PY" evaluate.py task=points gt="$TEST_ROOT/labels.csv" pred="$OUT/test/detections.csv" \
  shore_root="$TEST_ROOT/shoreline" output="$OUT/test/scores.json"
# detection F1 against every drawn object (the labels leave some out and some unknown, as xView3's did)
"$PY" evaluate.py task=points gt="$TEST_ROOT/objects.geojson" pred="$OUT/test/detections/$(basename "$TEST_SCENE").geojson" \
  distance_m=200 output="$OUT/test/scores_all_objects.json"
"$PY" overlay.py task=points image="$TEST_SCENE" pred="$OUT/test/detections.csv" gt="$TEST_ROOT/labels.csv" \
  output="$OUT/test/overlay.png"
echo
echo "Point demo finished. Outputs:"
echo "  model checkpoints     $OUT/train/{best,last}.pth (metrics.csv, curves.png)"
echo "  detections            $OUT/test/detections.csv (xView3 submission format) and detections/*.geojson"
echo "  scores                $OUT/test/scores.json (xView3 metric), scores_all_objects.json (point F1)"
echo "  overlay (open it)     $OUT/test/overlay.png"
echo "  demo data             $DEMO_DIR/sar (training scenes), $TEST_ROOT (held-out scene)"
