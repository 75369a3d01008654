"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (the original idx files).

The Hub and dataset mirrors are out of reach on our machines, so the real data comes from apt.
This reads the gzipped idx files directly: 60k/10k 28x28 grayscale images, 10 classes.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

__all__ = ['FMNIST_DIRS', 'CLASSES', 'find_fashion_mnist', 'load_fashion_mnist', 'FashionMNISTNotFound']

#: Where the Debian package puts the files; ``FASHION_MNIST_DIR`` overrides.
FMNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
CLASSES: List[str] = [
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


class FashionMNISTNotFound(FileNotFoundError):
    """Raised with install instructions when the idx files are not on this machine."""


def find_fashion_mnist(root: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The folder holding the four idx files: ``root``, ``$FASHION_MNIST_DIR``, or Debian's path.

    Args:
        root: a folder to look in first (None: only the environment variable and Debian's path).

    Returns:
        The first of those folders that holds all four files, or None.
    """
    candidates = [root] if root else [os.environ.get('FASHION_MNIST_DIR'), *FMNIST_DIRS]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for pair in _FILES.values() for f in pair):
            return Path(c)
    return None


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        data = f.read()
    magic = struct.unpack('>I', data[:4])[0]
    if magic != expected_magic:
        raise ValueError(f'{path} is not an idx file (magic {magic:#x}, expected {expected_magic:#x})')
    ndim = magic & 0xFF
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
        split: str = 'train', root: Optional[str | os.PathLike] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST.

    Args:
        split: ``'train'`` (60,000 images) or ``'test'`` (10,000).
        root: the folder of the idx files (None: found by :func:`find_fashion_mnist`).

    Returns:
        ``(images uint8 [N, 28, 28], labels int64 [N])``.
    """
    if split not in _FILES:
        raise ValueError(f'split must be one of {sorted(_FILES)}, got {split!r}')
    folder = find_fashion_mnist(root)
    if folder is None:
        where = root or ' or '.join(FMNIST_DIRS)
        raise FashionMNISTNotFound(
            f'Fashion-MNIST idx files not found in {where}. Install them with '
            '`sudo apt-get install dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a folder holding '
            f'{", ".join(f for pair in _FILES.values() for f in pair)}.')
    img_file, lbl_file = _FILES[split]
    images = _read_idx(folder / img_file, 0x803)
    labels = _read_idx(folder / lbl_file, 0x801)
    if len(images) != len(labels):
        raise ValueError(f'{folder}: {len(images)} images but {len(labels)} labels in split {split!r}')
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
