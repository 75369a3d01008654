#!/usr/bin/env bash
# GPU check: figures 1-4 (and the graph-break check) on one CUDA GPU in bf16, with and without
# channels_last, eager and torch.compile. Sized for about 6 minutes on an H100-class card; the per-figure
# time limits below cap it at 9.5 minutes. Not yet run: no GPU was available when it was written.
# Usage: bash benchmarks/gpu_check.sh [output.md]   (run from the repository root)
# Prints markdown; paste it into docs/benchmarks.md under "GPU" with the card's name (first line).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
OUT=${1:-}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1

"$PY" - <<'EOF' || { echo "gpu_check.sh: no CUDA device visible to torch; nothing to run" >&2; exit 1; }
import torch
assert torch.cuda.is_available()
print(f'GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}')
EOF

run() {  # run one figure with a time limit; echo the command first so the output documents itself
  local limit=$1; shift
  echo; echo "\`$*\`"; echo
  timeout "$limit" "$PY" "$@" || echo "(exit $?: timed out or failed)"
}

figures() {
  # Figure 1: inference, eager (both layouts), then compiled (compile time is spent in the warm-up)
  run 80 benchmarks/inference.py --device cuda --dtype bfloat16 --channels-last both --img-size 224 \
      --batch-sizes 32 256 --reps 7 --iters 5 --warmup 3
  run 120 benchmarks/inference.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 256 --reps 7 --iters 5 --warmup 3 --archs resnet50 --compile
  # Figures 2 and 3: training speed and peak memory (torch.cuda.max_memory_allocated), eager then compiled
  run 80 benchmarks/training.py --device cuda --dtype bfloat16 --channels-last both --img-size 224 \
      --batch-sizes 128 --reps 7 --iters 3 --warmup 3 --archs resnet18 resnet50 resnetv2_50
  run 140 benchmarks/training.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --reps 5 --iters 3 --warmup 2 --archs resnet50 --compile
  # Figure 4: the trainer vs a pure step and a hand-written accelerate loop (2 loader workers each)
  run 70 benchmarks/trainer.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --steps 30 --reps 3 --num-workers 2 --archs resnet50
  # Figure 5 and the graph-break check
  run 40 benchmarks/ceiling.py --device cuda --dtype bfloat16 --channels-last yes --img-size 224 \
      --batch-sizes 128 --reps 5 --iters 3 --warmup 3
  run 40 benchmarks/compile_check.py
}

if [ -n "$OUT" ]; then figures | tee "$OUT"; else figures; fi
