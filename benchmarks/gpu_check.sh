#!/usr/bin/env bash
# GPU check: figures 1-5 and the graph-break/fusion check on one CUDA GPU in bf16, with and without
# channels_last, eager and torch.compile, 224 px. Issue 14's figures are the training ones: train-step
# ratio (target >= 0.98) and peak memory (target <= 1.02) for resnet50, resnetv2_50 and resnext50_32x4d
# at batch 128, eager (both layouts) and compiled (channels_last), plus which inductor kernels hold the
# dropout. Sized for about 6 minutes on an H100-class card; the per-figure time limits below cap it at
# 10 minutes. Exits non-zero when any figure fails or times out (after running the others).
# Usage: bash benchmarks/gpu_check.sh [output.md]   (run from the repository root)
# Prints markdown; paste it into docs/benchmarks.md under "GPU" with the card's name (first line).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then  # $PY wins, then the project's .venv, then python on PATH
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT=${1:-}
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
  local status=0
  timeout "$limit" "$PY" "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "(FAILED: exit status $status; 124 means it ran past ${limit}s)"
    FAILED=$((FAILED + 1))
  fi
}

figures() {
  # Figure 1: inference, eager (both layouts), then compiled (compile time is spent in the warm-up)
  run 60 benchmarks/inference.py --device cuda --dtype bfloat16 --channels-last both --img-size 224 \
      --batch-sizes 32 256 --reps 7 --iters 5 --warmup 3
  run 90 benchmarks/inference.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 256 --reps 7 --iters 5 --warmup 3 --archs resnet50 --compile
  # Figures 2 and 3 (issue 14): train-step speed and peak memory (torch.cuda.max_memory_allocated),
  # batch 128, eager in both layouts, then compiled in channels_last
  run 110 benchmarks/training.py --device cuda --dtype bfloat16 --channels-last both --img-size 224 \
      --batch-sizes 128 --reps 7 --iters 3 --warmup 3 --archs resnet18 resnet50 resnetv2_50 resnext50_32x4d
  run 210 benchmarks/training.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --reps 5 --iters 3 --warmup 2 --archs resnet50 resnetv2_50 resnext50_32x4d --compile
  # Figure 4: the trainer vs a pure step and a hand-written accelerate loop (2 loader workers each)
  run 50 benchmarks/trainer.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --steps 30 --reps 3 --num-workers 2 --archs resnet50
  # Figure 5, the graph-break check, and which triton kernels hold the dropout (one block, fwd + bwd)
  run 30 benchmarks/ceiling.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --reps 5 --iters 3 --warmup 3
  run 50 benchmarks/compile_check.py --fusion --device cuda --channels-last
  echo
  if [ "$FAILED" -ne 0 ]; then echo "gpu_check.sh: $FAILED figure(s) failed" >&2; return 1; fi
}

if [ -n "$OUT" ]; then figures | tee "$OUT"; else figures; fi
