#!/usr/bin/env bash
# `make demo`: get Fashion-MNIST, fine-tune resnet18_dropres, print a results table, write runs/demo/.
# Sized to finish in under 10 minutes on 2 CPU cores (see docs/training.md for the measured numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-runs/demo}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# one compute thread + one data-loader process fill 2 cores without oversubscription (2 spinning
# OpenMP threads next to a loader, or on a busy box, run several times slower); override to taste
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

say() { printf '\n== %s\n' "$*"; }
have_fmnist() { "$PY" -c 'import sys; from timm_dropres.training.fmnist import find_fashion_mnist; sys.exit(find_fashion_mnist() is None)'; }
online() { "$PY" - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], method='HEAD'), timeout=5)
except Exception:
    sys.exit(1)
PY
}

say "1/3 Fashion-MNIST"
DATA_ARGS=(--dataset fashion_mnist)
if have_fmnist; then
    echo "found Debian's dataset-fashion-mnist"
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi
    fi
    if [ "$SUDO" != "none" ]; then
        echo "installing Debian's dataset-fashion-mnist with apt-get"
        $SUDO apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
            || { $SUDO apt-get update -qq && $SUDO apt-get install -y dataset-fashion-mnist >/dev/null; } || true
    else
        echo "apt-get is here but needs root: run 'sudo apt-get install dataset-fashion-mnist' to skip the download"
    fi
fi
if ! have_fmnist; then
    if online http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/; then
        echo "downloading Fashion-MNIST with torchvision into data/"
        DATA_ARGS=(--dataset torch/fashion_mnist --download --data-dir data)
    else
        cat >&2 <<'MSG'
Fashion-MNIST is not available and this machine is offline. Get it one of these ways, then rerun `make demo`:
  * Debian/Ubuntu:  sudo apt-get install dataset-fashion-mnist
  * any machine:    copy the four *-ubyte.gz files of Fashion-MNIST into a folder and
                    export FASHION_MNIST_DIR=/that/folder
MSG
        exit 1
    fi
fi

say "2/3 fine-tune resnet18_dropres"
MODEL_ARGS=(--model resnet18_dropres)
if [ -z "${HF_HUB_OFFLINE:-}" ] && online https://huggingface.co/api/models/timm/resnet18.a1_in1k; then
    echo "Hugging Face Hub reachable: starting from ImageNet-pretrained weights (timm/resnet18.a1_in1k)"
    MODEL_ARGS=(--model resnet18_dropres.a1_in1k --pretrained)
else
    echo "Hugging Face Hub not reachable: training from scratch (random initialisation)"
fi
"$PY" -m timm_dropres.cli.finetune --config configs/fashion_mnist_resnet18.yaml "${DATA_ARGS[@]}" "${MODEL_ARGS[@]}" \
    --output-dir "$OUT" --overwrite "$@"

say "3/3 results ($OUT)"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = json.loads((out / 'summary.json').read_text())
print(f"model {s['model']} ({'pretrained' if s['config']['pretrained'] else 'from scratch'}), "
      f"data {s['data']}: {s['train_size']} train / {s['val_size']} val images, input {tuple(s['input_size'])}")
print(f"{'epoch':>5} {'train loss':>10} {'val loss':>9} {'top-1 %':>8} {'top-5 %':>8}")
for h in s['history']:
    print(f"{h['epoch']:>5} {h['train_loss']:>10.4f} {h['loss']:>9.4f} {h['top1']:>8.2f} {h['top5']:>8.2f}")
b = s['best']
print(f"best: epoch {b['epoch']}, top-1 {b['top1']:.2f} %, top-5 {b['top5']:.2f} %")
print(f"throughput {s['throughput']['train_img_per_s']:.0f} img/s (training), wall time {s['wall_time_s'] / 60:.1f} min")
print('per-class top-1 (last epoch): ' + ', '.join(f'{k} {v:.0f}' for k, v in s['last']['per_class_accuracy'].items()))
print(f"outputs: {out}/best and {out}/last (load with timm.create_model('local-dir:{out}/best', pretrained=True)), "
      f"{out}/summary.json")
PY
