#!/usr/bin/env bash
# The Open Cities 3rd-place workflow as one re-runnable pipeline over the public CLIs.
#
#   stage 1  data preparation (scales 1, 2, 0.5) and training of the b1 model
#   stage 2  self-training (Noisy Student): negative mining and TTA pseudo-labels of the b1 teacher on
#            unlabelled images, averaged into soft labels, then a new b2 student (Mish, context block,
#            drop-connect 0.5) trained on the labelled chips plus the soft labels; the student starts
#            from ImageNet weights (PRETRAINED) or from B2_INIT, never from the b1 teacher
#   stage 3  the final TTA ensemble of both models on the test images, and evaluation when labels exist
#
# Usage: scripts/pipeline.sh [STAGE ...]        (default: 1 2 3)
# Settings (environment variables, defaults in brackets):
#   DATA_DIR      labelled training data for dataset.py (STAC catalog, CSV index or image/label pairs) [built-in demo]
#   TEST_DIR      images to predict in stage 3 (folder, file or STAC catalog)                       [demo test images]
#   TEST_LABELS   ground-truth footprints for TEST_DIR (file or folder) to evaluate against           [demo test labels]
#   UNLABELED_DIR images used for negative mining and pseudo-labels in stage 2 (test, tier 2)         [TEST_DIR]
#   OUT           output root                                                                         [outputs/pipeline]
#   GPUS          processes per node for training and inference (torchrun when > 1)                   [1]
#   B1_ARGS, B2_ARGS   extra train.py overrides (e.g. "max_steps=40000 batch_size=5")
#   PRETRAINED    ImageNet encoder weights for both trainings (downloaded once)    [true; false on the built-in demo]
#   B2_INIT       a b2 checkpoint (same architecture) the student starts from instead of ImageNet     [none]
#   SOFT_CHIP_SIZE     soft labels of images larger than this are cut into chips of this size (px)  [1024]
#   B1_WIDTH, B2_WIDTH inference widths of the two models in stage 3                                  [672, 1024]
#   PSEUDO_WIDTH  stage 2: width of negative mining and of the pseudo-labels' first scale (then B1_WIDTH) [512]
#   PREP_SCALES   scales for dataset.py in stage 1                                                    ["1 2 0.5"]
#   INFER_ARGS    extra inference.py overrides for every inference call
# Each command is echoed before it runs; the first failure stops the pipeline; a finished stage leaves
# OUT/.stage<N>.done and is skipped when the pipeline is run again. A stage that runs clears the marks
# of the later stages (they depend on it), so e.g. stage 3 runs again, with both models, after stage 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

OUT=${OUT:-outputs/pipeline}
GPUS=${GPUS:-1}
DEMO_DIR=${BUILDINGS_DEMO_DIR:-data/demo}
if [ -z "${DATA_DIR:-}" ]; then
  "$PY" -c "from lib import demo_scene; demo_scene.ensure_demo_scene()"
  DATA_DIR=$DEMO_DIR
  TEST_DIR=${TEST_DIR:-$DEMO_DIR/test/images}
  TEST_LABELS=${TEST_LABELS:-$DEMO_DIR/test/labels}
  PRETRAINED=${PRETRAINED:-false}  # the demo runs offline
fi
PRETRAINED=${PRETRAINED:-true}
TEST_DIR=${TEST_DIR:?set TEST_DIR to the images to predict}
UNLABELED_DIR=${UNLABELED_DIR:-$TEST_DIR}
PREP_SCALES=${PREP_SCALES:-"1 2 0.5"}
B1_WIDTH=${B1_WIDTH:-672}
B2_WIDTH=${B2_WIDTH:-1024}
SOFT_CHIP_SIZE=${SOFT_CHIP_SIZE:-1024}
PSEUDO_WIDTH=${PSEUDO_WIDTH:-512}
TTA="[none,hflip,vflip,hvflip,transpose]"

run() { echo "+ $*"; "$@"; }
train() {
  if [ "$GPUS" -gt 1 ]; then run "$PY" -m torch.distributed.run --nproc_per_node="$GPUS" train.py "$@"
  else run "$PY" train.py "$@"; fi
}
infer() {  # images are shared among the processes; the outputs are those of one process
  if [ "$GPUS" -gt 1 ]; then run "$PY" -m torch.distributed.run --nproc_per_node="$GPUS" inference.py "$@"
  else run "$PY" inference.py "$@"; fi
}
done_mark() { echo "$OUT/.stage$1.done"; }

stage1() {
  for s in $PREP_SCALES; do
    run "$PY" dataset.py base_dir="$DATA_DIR" out_dir="$OUT/chips" scale="$s"
  done
  # shellcheck disable=SC2086
  train data_dir="$OUT/chips" fold=0 model_name=efficientnet-b1 pretrained="$PRETRAINED" output_dir="$OUT/b1" \
    ${B1_ARGS:-}
}

stage2() {
  local b1="$OUT/b1/best.pth"
  # Negative mining: confidently empty images join the training chips as negatives (no mask file).
  # shellcheck disable=SC2086
  infer model="$b1" data_dir="$UNLABELED_DIR" width="$PSEUDO_WIDTH" mine_empty=True \
    output_dir="$OUT/mining" output_dir_empty="$OUT/chips/mined_negatives" ${INFER_ARGS:-}
  # Pseudo-labels: TTA at two scales, averaged into soft labels.
  local widths="[$PSEUDO_WIDTH,$B1_WIDTH]"
  if [ "$B1_WIDTH" = "$PSEUDO_WIDTH" ]; then widths="[$B1_WIDTH]"; fi
  # shellcheck disable=SC2086
  infer model="$b1" data_dir="$UNLABELED_DIR" "tta=$TTA" "widths=$widths" \
    output_dir="$OUT/pseudo/b1" ${INFER_ARGS:-}
  run "$PY" combine_images.py base_dir="$OUT/pseudo" add_mask_suffix=True out_dir="$OUT/soft_labels" \
    soft_chip_size="$SOFT_CHIP_SIZE"
  # The student: a new b2 from ImageNet (or B2_INIT), trained on the chips and the teacher's soft labels.
  local init=(pretrained="$PRETRAINED")
  if [ -n "${B2_INIT:-}" ]; then init=(model="$B2_INIT"); fi
  # shellcheck disable=SC2086
  train data_dir="$OUT/chips" fold=0 model_name=efficientnet-b2 use_mish=True use_context_block=True \
    drop_connect_rate=0.5 soft_labels_dir="$OUT/soft_labels" "${init[@]}" output_dir="$OUT/b2" ${B2_ARGS:-}
}

stage3() {
  # one model: both widths as scale TTA; two models: b1 at B1_WIDTH and b2 at B2_WIDTH, as the original ensemble
  local models="[$OUT/b1/best.pth]" widths="[$B1_WIDTH,$B2_WIDTH]"
  if [ -f "$OUT/b2/best.pth" ]; then
    models="[$OUT/b1/best.pth,$OUT/b2/best.pth]" widths="[[$B1_WIDTH],[$B2_WIDTH]]"
  fi
  # outputs of another ensemble (b1 alone, before stage 2 ran) are replaced, not kept
  local fresh=() record="$OUT/final/.models"
  if [ -f "$record" ] && [ "$(cat "$record")" != "$models" ]; then fresh=(overwrite=True); fi
  # shellcheck disable=SC2086
  infer "model=$models" data_dir="$TEST_DIR" "tta=$TTA" "widths=$widths" \
    threshold=0.56 output_dir="$OUT/final" "${fresh[@]}" ${INFER_ARGS:-}
  echo "$models" > "$record"
  if [ -n "${TEST_LABELS:-}" ]; then
    run "$PY" evaluate.py gt="$TEST_LABELS" pred="$OUT/final/footprints" pred_masks="$OUT/final/masks" \
      images="$TEST_DIR" output="$OUT/final/scores.json"
  fi
}

stages=${*:-1 2 3}
for s in $stages; do
  if [ -f "$(done_mark "$s")" ]; then echo "= stage $s already done ($(done_mark "$s"))"; continue; fi
  echo "== stage $s"
  for later in 1 2 3; do
    if [ "$later" -gt "$s" ]; then rm -f "$(done_mark "$later")"; fi
  done
  "stage$s"
  mkdir -p "$OUT"; touch "$(done_mark "$s")"
done
echo "outputs in $OUT"
