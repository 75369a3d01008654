"""A small generated ImageFolder and a study spec over it, for the study tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import yaml
from PIL import Image

CLASSES = ('disc', 'bars', 'green')


def make_image_folder(root: Path, seed: int, train_per_class: int = 24, test_per_class: int = 8, size: int = 20
                      ) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: three learnable classes of noisy RGB images."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('test', test_per_class)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                if c == 0:
                    a[5:15, 5:15, 0] += 150
                elif c == 1:
                    a[::4, :, 2] += 180
                else:
                    a[:, :, 1] += 120
                Image.fromarray(a).save(d / f'{i}.png')
    return root


def study_dict(data_root: Path, out: Path, **over: Any) -> Dict[str, Any]:
    """Two configurations x two seeds of a tiny preresnet20 on ``data``; ``over`` replaces top-level keys."""
    spec = dict(
        name='tiny', out_dir=str(out / 'results'), work_dir=str(out / 'work'), seeds=2,
        data=dict(dataset=str(data_root), val_fraction=0.25, in_memory=True, augment=dict(pad=2, hflip=0.5)),
        train=dict(epochs=2, batch_size=12, opt='sgd', lr=0.05, warmup_epochs=0, smoothing=0.0),
        architectures=[dict(name='p20', model='preresnet20_cifar_dropres', img_size=20)],
        configs=dict(none={}, residual=dict(res_drop_rate=0.1)),
        comparisons=dict(main=[['residual', 'none']]))
    spec.update(over)
    return spec


def write_spec(path: Path, spec: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
