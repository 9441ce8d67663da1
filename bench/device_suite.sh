#!/usr/bin/env bash
# The device suite: one script that turns a lent GPU (H100/H200, no network) into numbers, in under 9 minutes.
#
#   bash bench/device_suite.sh [OUT_DIR]              # on the GPU machine; OUT_DIR defaults to $OUT
#   bash bench/device_suite.sh [OUT_DIR] --cpu-dry-run  # the same steps at tiny sizes on a CPU
#   bash bench/device_suite.sh [OUT_DIR] --kernels      # a lease of ~4 minutes: the kernels' parity tests and
#                                                       # benchmarks only (narrowed by BENCH_ONLY="mhce layernorm"
#                                                       # and PARITY_ONLY="tests/test_mhce.py")
#   bash bench/device_suite.sh [OUT_DIR] --variants     # a lease of ~8 minutes: the attention variants (#14):
#                                                       # FlexAttention parity and T12-size steps of each variant
#   bash bench/device_suite.sh [OUT_DIR] --architectures  # a lease of ~7 minutes: the other harder architectures
#                                                       # (#13, #15): GPU parity (xl_relative's FlexAttention, MoE's
#                                                       # grouped matmul) and T12-size steps of each
#
# Steps: environment; GPU parity tests of every kernel in bf16 and fp32 (and the model, KV cache, attention);
# the kernel, training-step and evaluator benchmarks (python -m bench); a 1-minute T12 training run with its loss
# curve and a profile of 3 of its steps (train.profile; its profile.txt goes into the summary); a markdown
# summary. Everything lands in OUT_DIR (8 files at most, as the device tool returns them):
# env.txt parity.log parity.xml bench.txt bench.json t12_metrics.jsonl curves.png summary.md
# Each step has a time limit (SIGINT, then SIGKILL 20 s later; exit code 124/137 in the summary), so that one
# slow step cannot cost the others their numbers inside a device call of 10 minutes. PARITY_SECONDS,
# BENCH_SECONDS and TRAIN_SECONDS override the limits, to fit what is left of a lease (e.g. a short --variants
# call right after the main one: `PARITY_SECONDS=60 BENCH_SECONDS=120 bash bench/device_suite.sh --variants`;
# the benchmarks keep to their budget, BENCH_SECONDS - 60 or half of it, and keep what they measured).
# Keep the summary as bench/results/<card>-<date>.md. A parity failure makes the script exit 1, loudly, but only
# after every other step has run and written what it measured.
# The machine has torch, triton, pytest, pytest-benchmark, numpy, tqdm and matplotlib but not gensim: carry the
# corpus (the device tool's carry: ["data"] with data/enwiki-sample.xml, which any `python -m train
# --data.source=sample` run here unpacks).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results/latest}
DRY=0
KERNELS=0
VARIANTS=0
ARCHITECTURES=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    --kernels) KERNELS=1 ;;
    --variants) VARIANTS=1 ;;
    --architectures) VARIANTS=1; ARCHITECTURES=1 ;;
    *) OUT_DIR=$arg ;;
  esac
done
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

DATA=sample
[ -f data/enwiki-sample.xml ] && DATA=data/enwiki-sample.xml
if [ "$DRY" = 1 ]; then
  PRESET=tiny; TRAIN_TIME=10
  PARITY_TESTS="tests/test_rmsnorm.py tests/test_swiglu.py tests/test_layernorm.py tests/test_mhce.py"
  LIMIT_PARITY=900; LIMIT_BENCH=900; LIMIT_TRAIN=300
else
  PRESET=t12; TRAIN_TIME=60
  LIMIT_PARITY=150; LIMIT_BENCH=300; LIMIT_TRAIN=120
  PARITY_TESTS="tests/test_rmsnorm.py tests/test_swiglu.py tests/test_layernorm.py tests/test_mhce.py
                tests/test_model_kernels.py
                tests/test_kv_cache.py tests/test_gpu.py"
fi
# Most wanted first: python -m bench starts no case past its budget (BUDGET below) and keeps what it measured when
# the limit interrupts it. The loss variants and LayerNorm are new; then the variants' steps, which have
# leases of their own but come free here when time is left; RMSNorm, SwiGLU and the evaluator were measured on the
# first H200.
BENCH_ARGS="--only mhce layernorm train_step architectures attention rmsnorm swiglu eval"
if [ "$VARIANTS" = 1 ]; then
  PARITY_TESTS="tests/test_gpu_variants.py::test_compiled_flex_attention_matches_the_dense_mask_with_gradients"
  BENCH_ARGS="--only attention"
  LIMIT_PARITY=150; LIMIT_BENCH=360
fi
if [ "$ARCHITECTURES" = 1 ]; then
  PARITY_TESTS="tests/test_gpu_variants.py::test_compiled_xl_relative_flex_attention_matches_the_math_path_with_gradients
                tests/test_gpu_variants.py::test_moe_grouped_matmul_under_autocast_matches_the_loop_with_gradients"
  BENCH_ARGS="--only architectures"
fi
if [ "$KERNELS" = 1 ]; then
  PARITY_TESTS=${PARITY_ONLY:-"tests/test_mhce.py tests/test_layernorm.py tests/test_rmsnorm.py tests/test_swiglu.py"}
  BENCH_ARGS="--only ${BENCH_ONLY:-mhce layernorm rmsnorm swiglu}"
  LIMIT_PARITY=90; LIMIT_BENCH=240
fi
LIMIT_PARITY=${PARITY_SECONDS:-$LIMIT_PARITY}
LIMIT_BENCH=${BENCH_SECONDS:-$LIMIT_BENCH}
LIMIT_TRAIN=${TRAIN_SECONDS:-$LIMIT_TRAIN}

step "environment"
{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "git: unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  echo "dry run: $DRY; data: $DATA"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# The GPU machine has pytest-xdist and 16 cores: 4 test processes share the GPU, so that the tests' compilation
# (CPU-bound) runs side by side. PARITY_WORKERS=0 runs them in one process.
WORKERS=""
if [ "${PARITY_WORKERS:-4}" != 0 ] && [ "$DRY" = 0 ] && $PY -c "import xdist" 2> /dev/null; then
  WORKERS="-n ${PARITY_WORKERS:-4}"
fi
step "parity tests ($PARITY_TESTS) ${WORKERS:-in one process}"
# shellcheck disable=SC2086
timeout -s INT -k 20 $LIMIT_PARITY $PY -m pytest -q -p no:cacheprovider $WORKERS $PARITY_TESTS \
  --junitxml="$OUT_DIR/parity.xml" > "$OUT_DIR/parity.log" 2>&1
PARITY=$?
tail -5 "$OUT_DIR/parity.log"

step "benchmarks (python -m bench)"
BUDGET=$((LIMIT_BENCH - 60 > LIMIT_BENCH / 2 ? LIMIT_BENCH - 60 : LIMIT_BENCH / 2))  # no case starts after it
# shellcheck disable=SC2086
timeout -s INT -k 20 $LIMIT_BENCH $PY -m bench $BENCH_ARGS --budget $BUDGET --json "$OUT_DIR/bench.json" \
  > "$OUT_DIR/bench.txt" 2>&1
BENCH=$?
tail -60 "$OUT_DIR/bench.txt"

WORK=$(mktemp -d)  # the run folder stays out of OUT_DIR: a T12 checkpoint is ~0.5 GB
TRAIN=0
if [ "$KERNELS" = 0 ] && [ "$VARIANTS" = 0 ]; then
  step "$PRESET training for $TRAIN_TIME s"
  timeout -s INT -k 20 $LIMIT_TRAIN $PY -m train --preset=$PRESET --data.source=$DATA --out_dir="$WORK/run" \
    --train.max_time=$TRAIN_TIME --train.max_steps=0 --train.eval_interval=100 --train.full_eval_interval=0 \
    --train.ckpt_interval=0 --train.profile=3 > "$WORK/train.log" 2>&1
  TRAIN=$?
  tail -3 "$WORK/train.log"
  cp "$WORK/run/metrics.jsonl" "$OUT_DIR/t12_metrics.jsonl" 2>/dev/null
  $PY -m train.plot "$WORK/run" --out "$OUT_DIR/curves.png" > /dev/null 2>&1 || echo "no curves (plot failed)"
fi

step "summary"
NO_TRAIN=""
{ [ "$KERNELS" = 1 ] || [ "$VARIANTS" = 1 ]; } && NO_TRAIN="--no-train"
# shellcheck disable=SC2086
$PY -m bench.summary "$OUT_DIR" --parity-rc $PARITY --bench-rc $BENCH --train-rc $TRAIN $NO_TRAIN \
  --train-log "$WORK/train.log" --profile "$WORK/run/profile.txt" > "$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
echo
echo "wrote $OUT_DIR; keep summary.md as bench/results/<card>-<date>.md"
if [ $PARITY -ne 0 ]; then
  echo "!!! PARITY FAILED: see $OUT_DIR/parity.log" >&2
  exit 1
fi
[ $BENCH -eq 0 ] && [ $TRAIN -eq 0 ] || exit 1
