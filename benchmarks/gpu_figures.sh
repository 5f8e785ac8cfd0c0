#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run, for a machine with one CUDA GPU:
#
#   bash benchmarks/gpu_figures.sh [folder]        # default outputs/gpu_figures; needs no data or download
#
# The steps come in order of importance, so that a run stopped early still has the first figures:
# 1. the machine: GPU, CPU model, Python and torch versions;
# 2. training steps/s (benchmarks/bench_train.py): b0 and light in fp32, bf16 and fp16 at TRAIN_SIZE px,
#    batch TRAIN_BATCH, on the built-in demo chips (target: AMP >= 2x fp32);
# 3. a checkpoint to infer with: train.py arch=b0 on the demo chips for CKPT_STEPS steps on the GPU, so that the
#    footprints written below are a trained model's rather than a random one's;
# 4. the inference pipeline against the model alone (bench_inference.py section 2, target >= 90 %) on TILES
#    generated tiles, with what its CPU stages allow;
# 5. processes per GPU: PROC_IMAGES copies of the tiles under torchrun with 1, 2, 4 and 8 processes sharing the
#    GPU (the backend trial is cached first); benchmarks/folder_rate.py then prints each run's steady images/s
#    after the processes' start-up and first image, as a share of step 4's model-only images/s;
# 6. the rest of bench_inference.py: the seed's loop against the defaults and each backend, and the precision
#    table with its fastest channels_last row also under torch.compile (EXTRA_INFERENCE_ARGS);
# 7. the rest of bench_train.py: b0 in NCHW against channels_last, and under torch.compile (EXTRA_TRAIN_ARGS).
# Each step has a time limit (LIMIT seconds), and a failed step does not stop the next ones. Everything printed
# goes to <folder>/log.txt (or $LOG); the benchmarks' JSON beside it (train*.json, inference*/results.json). PYTHON, DEVICE and the sizes below can be
# overridden (DEVICE=cpu TILES=2 TILE=512 WIDTH=256 ... checks the script itself on a CPU in a few minutes).
set -uo pipefail
OUT_DIR=${1:-$(dirname "$0")/../outputs/gpu_figures}  # a folder given is taken from where the script is called
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$(realpath "${LOG:-$OUT_DIR/log.txt}")  # or a file elsewhere, kept even if the run is stopped before its end
: >"$LOG"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TRAIN_SIZE=${TRAIN_SIZE:-512} TRAIN_BATCH=${TRAIN_BATCH:-16} TRAIN_STEPS=${TRAIN_STEPS:-20}
TRAIN_PRESETS=${TRAIN_PRESETS:-b0,light}
CKPT_STEPS=${CKPT_STEPS:-300} CKPT_WIDTH=${CKPT_WIDTH:-256} CKPT_BATCH=${CKPT_BATCH:-16}
TILES=${TILES:-32} TILE=${TILE:-1024} WIDTH=${WIDTH:-672}
PROCS=${PROCS:-1 2 4 8} PROC_IMAGES=${PROC_IMAGES:-128}
EXTRA_INFERENCE_ARGS=${EXTRA_INFERENCE_ARGS:---skip pipeline memory --compile}
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:---presets b0 --precision bf16,fp16 --compile}
LIMIT=${LIMIT:-240}
export PYTHONUNBUFFERED=1 BUILDINGS_CACHE=$OUT_DIR/cache PYTHON DEVICE OUT_DIR TILE WIDTH

step() {  # step <title> <command...>: run it under the time limit, log its output and how it ended
  local title=$1 start rc
  shift
  echo "=== $title" | tee -a "$LOG"
  start=$(date +%s%N)
  timeout "$LIMIT" bash -c '"$@"' "$title" "$@" 2>&1 | tee -a "$LOG"  # bash: the functions below too
  rc=${PIPESTATUS[0]}
  echo "--- $title: exit $rc after $((($(date +%s%N) - start) / 1000000)) ms" | tee -a "$LOG"
  return "$rc"
}

machine() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  lscpu | grep -E '^(Model name|CPU\(s\)):'
  "$PYTHON" -c "import sys, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__)"
}

export tta='[none,hflip,vflip,hvflip,transpose]'
folder_run() {  # folder_run <processes> <images> <output>: a folder of tiles through inference.py, torchrun-started
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$1" inference.py device="$DEVICE" \
    data_dir="$2" model="$OUT_DIR/train/best.pth" tile_size="$TILE" width="$WIDTH" \
    tta="$tta" match_gsd=false progress=false overwrite=true output_dir="$3"
}
copies() {  # copies <tiles> <folder>: PROC_IMAGES hard links to the tiles, round robin (copies where links fail),
  local tiles=("$1"/*.tif) i tile copy  # so that every process has many images
  rm -rf "$2" && mkdir -p "$2"
  for ((i = 0; i < PROC_IMAGES; i++)); do
    tile=${tiles[i % ${#tiles[@]}]}
    copy=$2/$(printf 'copy%04d' "$i")_$(basename "$tile")
    ln "$tile" "$copy" 2>/dev/null || cp "$tile" "$copy"
  done
}
export -f machine folder_run

bench_inference() {  # bench_inference <title> <workdir> <args...>: with the checkpoint, on tiles it generates
  step "$1" "$PYTHON" benchmarks/bench_inference.py --device "$DEVICE" --model "$OUT_DIR/train/best.pth" \
    --tiles "$TILES" --size "$TILE" --width "$WIDTH" --workdir "$OUT_DIR/$2" "${@:3}"
}

bench_train() {  # bench_train <title> <json> <args...>
  step "$1" "$PYTHON" benchmarks/bench_train.py --device "$DEVICE" --size "$TRAIN_SIZE" --batch "$TRAIN_BATCH" \
    --steps "$TRAIN_STEPS" --no-grid --no-cache --json "$OUT_DIR/$2" "${@:3}"
}

step "machine" machine
bench_train "training steps/s" train.json --presets "$TRAIN_PRESETS" --no-format
step "checkpoint" "$PYTHON" train.py arch=b0 device="$DEVICE" max_steps="$CKPT_STEPS" width="$CKPT_WIDTH" \
  batch_size="$CKPT_BATCH" pretrained=false progress=false output_dir="$OUT_DIR/train"
if [ -f "$OUT_DIR/train/best.pth" ]; then
  bench_inference "pipeline against model-only" inference --skip tta backends precision memory
  if [ -d "$OUT_DIR/inference/tiles/images" ]; then
    step "trial cached" folder_run 1 "$OUT_DIR/inference/tiles/images" "$OUT_DIR/procs_warmup"
    copies "$OUT_DIR/inference/tiles/images" "$OUT_DIR/procs_tiles"
    runs=()
    for n in $PROCS; do
      step "processes per GPU: $n" folder_run "$n" "$OUT_DIR/procs_tiles" "$OUT_DIR/procs_$n"
      runs+=("$OUT_DIR/procs_$n")
    done
    step "processes per GPU: steady images/s" "$PYTHON" benchmarks/folder_rate.py "${runs[@]}" \
      --model-only "$OUT_DIR/inference/results.json"
  fi
  # shellcheck disable=SC2086  # the extra arguments are words
  bench_inference "inference, other sections" inference_rest $EXTRA_INFERENCE_ARGS
fi
# shellcheck disable=SC2086
bench_train "training, memory format and compile" train_extra.json $EXTRA_TRAIN_ARGS
echo "=== summary (whole steps; the figures are in the steps' own lines above)"
grep '^--- ' "$LOG"
echo "log: $LOG"
