"""Shared helpers for the trainer tests (test_data, test_train, test_validate): tiny generated datasets."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('circle', 'square', 'stripes')


def make_image_folder(
        root: Path, n_train: int = 12, n_val: int = 5, *, classes: Sequence[str] = CLASSES, gray: bool = False,
        size: int = 32, seed: int = 0, with_val: bool = True,
) -> Path:
    """An ImageFolder whose classes differ by an easy, colour-coded pattern (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    splits = [('train', n_train)] + ([('val', n_val)] if with_val else [])
    for split, n in splits:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((size, size, 3)) * 60).astype(np.uint8)
                lo, hi = size // 4, 3 * size // 4
                if c % 3 == 0:
                    a[lo:hi, lo:hi, 0] += 150
                elif c % 3 == 1:
                    a[lo:hi, lo:hi, 1] += 150
                else:
                    a[:, ::4, 2] += 150
                img = Image.fromarray(a)
                if gray:
                    img = img.convert('L')
                img.save(d / f'{name}_{i:03d}.png')
    return root


def tiny_config(dataset: Path | str, output_dir: Path | str, **overrides: Any) -> Any:
    """A FinetuneConfig that trains test_resnet_dropres at 32x32 in about a second per epoch."""
    from timm_dropres.training.config import FinetuneConfig
    kw: Dict[str, Any] = dict(
        model='test_resnet_dropres', dataset=str(dataset), output_dir=str(output_dir), epochs=1, batch_size=4,
        img_size=32, num_workers=0, progress=False, lr=3e-3, warmup_epochs=0, cpu=True, seed=0)
    kw.update(overrides)
    return FinetuneConfig(**kw)


def subprocess_env(**extra: str) -> Dict[str, str]:
    """Environment for child processes: the repo importable, offline Hub, one thread per process."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env.update(HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false')
    env.update(extra)
    return env


PYTHON = sys.executable
