#!/usr/bin/env bash
# GPU check: figures 1-5 and the graph-break/fusion check on one CUDA GPU in bf16, with and without
# channels_last, eager and torch.compile, 224 px. Issue 14's figures are the training ones: train-step
# ratio (target >= 0.98) and peak memory (target <= 1.02) for resnet50, resnetv2_50 and resnext50_32x4d
# at batch 128, eager (both layouts) and compiled (channels_last), plus which inductor kernels hold the
# dropout. The dropres models train with res_drop_rate 0.1.
# The figures run in the order of what issue 14 needs first, each under a time limit (18 minutes if
# all ran to their limits; expect about 10 on an H200). With GPU_CHECK_BUDGET=N (seconds), a figure whose
# limit no longer fits in what is left of N is skipped and named, so a short device lease still brings
# back the most important tables; unset or 0: no budget. Exits non-zero when any figure fails, times out
# or is skipped (after running the others).
# Issue 22: first the Triton residual dropout's tests on the card (tests/models/test_triton_dropout.py: the
# regenerated mask is the forward's, gradients, checkpoint replay), then the kernel side by side with the
# previous op (dropout_impl.py: current vs unfused), and every figure also appends its records to a JSON
# lines file, summarised at the end (benchmarks/gpu_summary.py) as docs/results/gpu/<UTC date>.json: per
# arch and layout the eager and compiled step and peak-memory ratios, with the device and versions
# (GPU_CHECK_JSON=path writes it elsewhere). Compiled resnet50 runs twice: with inductor's native_dropout (the
# default) and with the Triton kernels forced (TIMM_DROPRES_DROPOUT_KERNEL=triton), to choose between them.
# Usage: [GPU_CHECK_BUDGET=N] [GPU_CHECK_JSON=path] bash benchmarks/gpu_check.sh [output.md]   (from the repo root)
# Prints markdown; paste it into docs/benchmarks.md under "GPU" with the card's name (first line).
set -euo pipefail
START=$SECONDS
cd "$(dirname "$0")/.."
BUDGET=${GPU_CHECK_BUDGET:-0}
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
  echo "gpu_check.sh: GPU_CHECK_BUDGET must be a whole number of seconds (0: no budget), got '$BUDGET'" >&2
  exit 2
fi
if [ -z "${PY:-}" ]; then  # $PY wins, then the project's .venv, then python on PATH
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT=${1:-}
JSON_OUT=${GPU_CHECK_JSON:-docs/results/gpu/$(date -u +%F).json}
JSONL=$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX.jsonl")
trap 'rm -f "$JSONL"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1

"$PY" - <<'PYEOF' || { echo "gpu_check.sh: no CUDA device visible to torch; nothing to run" >&2; exit 1; }
import torch
assert torch.cuda.is_available()
print(f'GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}')
PYEOF

FAILED=0
run() {  # run one figure with a time limit; echo the command first so the output documents itself
  local limit=$1; shift
  echo; echo "\`$*\`"; echo
  if [ "$BUDGET" -gt 0 ] && [ $((SECONDS - START + limit)) -gt "$BUDGET" ]; then
    echo "(SKIPPED: its ${limit}s limit does not fit in what is left of GPU_CHECK_BUDGET=${BUDGET}s)"
    FAILED=$((FAILED + 1)); return
  fi
  local status=0 t0=$SECONDS
  timeout -k 10 "$limit" "$PY" "$@" --json "$JSONL" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "(FAILED: exit status $status; 124 means it ran past ${limit}s)"
    FAILED=$((FAILED + 1))
  fi
  echo; echo "(took $((SECONDS - t0)) s)"
}

tests() {  # the Triton kernels on the card (the launcher that reruns them on CPU is marked slow: skipped)
  echo; echo "\`$PY -m pytest -q -m 'not slow' tests/models/test_triton_dropout.py\`"; echo
  if [ "$BUDGET" -gt 0 ] && [ $((SECONDS - START + 180)) -gt "$BUDGET" ]; then
    echo "(SKIPPED: its 180s limit does not fit in GPU_CHECK_BUDGET=${BUDGET}s)"; FAILED=$((FAILED + 1)); return
  fi
  local status=0
  timeout -k 10 180 "$PY" -m pytest -q -p no:cacheprovider -m 'not slow' tests/models/test_triton_dropout.py \
      2>&1 | tail -n 15 || status=$?
  if [ "$status" -ne 0 ]; then echo "(FAILED: exit status $status)"; FAILED=$((FAILED + 1)); fi
}

TRAIN=(benchmarks/training.py --device cuda --dtype bfloat16 --img-size 224 --batch-sizes 128 --res-drop-rate 0.1)
figures() {
  tests
  # Figures 2 and 3 (issue 14): train-step speed and peak memory (torch.cuda.max_memory_allocated),
  # batch 128, eager in both layouts
  run 120 "${TRAIN[@]}" --channels-last both --reps 7 --iters 3 --warmup 3 \
      --archs resnet18 resnet50 resnetv2_50 resnext50_32x4d
  # Issue 22: the Triton kernels (current) against the previous op (unfused: native_dropout, separate add and
  # ReLU) and the base, interleaved in one process, eager, both layouts
  run 150 benchmarks/dropout_impl.py --device cuda --dtype bfloat16 --img-size 224 --batch-sizes 128 \
      --channels-last both --res-drop-rate 0.1 --reps 5 --iters 3 --warmup 3 --variants current unfused \
      --archs resnet50 resnetv2_50 resnext50_32x4d
  # which triton kernels hold the dropout (one block, forward + backward), and graph breaks
  run 90 benchmarks/compile_check.py --fusion --device cuda --channels-last
  # Figures 2 and 3 compiled, channels_last, one arch per call (each compiles two models; an H200 took
  # 129 s for resnet50 and 102 s for resnetv2_50, and more than 115 s for resnext50_32x4d)
  run 180 "${TRAIN[@]}" --channels-last yes --reps 5 --iters 3 --warmup 2 --compile --archs resnet50
  run 180 "${TRAIN[@]}" --channels-last yes --reps 5 --iters 3 --warmup 2 --compile --archs resnetv2_50
  run 240 "${TRAIN[@]}" --channels-last yes --reps 5 --iters 3 --warmup 2 --compile --archs resnext50_32x4d
  # Issue 22: compiled with the Triton kernels as custom ops (no mask kept, but opaque to inductor's fusion)
  # instead of native_dropout, which inductor fuses but whose mask it keeps: the JSON's "compiled (triton)"
  TIMM_DROPRES_DROPOUT_KERNEL=triton run 180 "${TRAIN[@]}" --channels-last yes --reps 5 --iters 3 --warmup 2 \
      --compile --archs resnet50
  # Figure 1: inference, eager (both layouts)
  run 60 benchmarks/inference.py --device cuda --dtype bfloat16 --channels-last both --img-size 224 \
      --batch-sizes 32 256 --reps 7 --iters 5 --warmup 3
  # Figure 4: the trainer vs a pure step and a hand-written accelerate loop (8 loader workers each: 2
  # could not feed an H200 at 224 px)
  run 90 benchmarks/trainer.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --steps 30 --reps 3 --num-workers 8 --archs resnet50 --res-drop-rate 0.1
  # Figure 5: compute ceiling
  run 40 benchmarks/ceiling.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --reps 5 --iters 3 --warmup 3 --res-drop-rate 0.1
  # Figure 1 compiled
  run 90 benchmarks/inference.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 256 --reps 7 --iters 5 --warmup 3 --archs resnet50 --compile
  echo
  if [ -s "$JSONL" ]; then
    "$PY" benchmarks/gpu_summary.py "$JSONL" --out "$JSON_OUT" --command "bash benchmarks/gpu_check.sh" \
      && echo "JSON summary: $JSON_OUT" || FAILED=$((FAILED + 1))
  else
    echo "(no JSON summary: no figure finished)"
  fi
  if [ "$FAILED" -ne 0 ]; then echo "gpu_check.sh: $FAILED figure(s) failed or were skipped" >&2; return 1; fi
}

if [ -n "$OUT" ]; then figures | tee "$OUT"; else figures; fi
