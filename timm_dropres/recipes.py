"""The YAML recipes shipped inside the package (``timm_dropres/configs/``), found by name or by path.

``pip install timm-dropres`` has no repository checkout, so ``--config configs/fashion_mnist_resnet18.yaml``
would name a file that is not there. Every ``--config`` therefore takes an existing file first, and
otherwise a shipped recipe by name: ``fashion_mnist_resnet18``, ``paper/preresnet110_cifar10``, with or
without ``.yaml`` and with or without the repository's ``configs/`` prefix. In a checkout, ``configs/``
is a link to the same folder, so both spellings read the same file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

__all__ = ['RECIPES_DIR', 'list_recipes', 'find_recipe']

#: Where the shipped recipes live (package data; ``configs/`` in a checkout links here).
RECIPES_DIR = Path(__file__).resolve().parent / 'configs'
_SUFFIXES = ('.yaml', '.yml')


def list_recipes() -> List[str]:
    """Names of the shipped recipes, sorted: ``'fashion_mnist_resnet18'``, ``'paper/preresnet110_cifar10'``, ...

    ``accelerate/*`` are accelerate launch configs (``accelerate launch --config_file``), the rest
    are ``dropres-finetune`` recipes, ``dropres-study`` specs (``studies/*``) and the first studies' specs
    (``ablation_fmnist``, re-analysed by ``dropres-ablate``; ``study_overfit``, read by the benchmarks).
    """
    return sorted(p.relative_to(RECIPES_DIR).with_suffix('').as_posix()
                  for p in RECIPES_DIR.rglob('*') if p.suffix in _SUFFIXES and p.is_file())


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """The YAML file that ``--config name_or_path`` means.

    Args:
        name_or_path: a path to an existing file, or the name of a shipped recipe (see :func:`list_recipes`),
            optionally with ``.yaml`` and a leading ``configs/``.

    Returns:
        The file's path.

    Raises:
        FileNotFoundError: neither a file nor a shipped recipe; the message lists the shipped names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    key = str(name_or_path).replace('\\', '/').removeprefix('./').removeprefix('configs/')
    for suffix in _SUFFIXES:
        key = key.removesuffix(suffix)
    if key in list_recipes():  # only listed names: no path tricks out of the folder
        return next(RECIPES_DIR / f'{key}{s}' for s in _SUFFIXES if (RECIPES_DIR / f'{key}{s}').is_file())
    raise FileNotFoundError(f'--config {name_or_path}: no such file, and no shipped recipe of that name; '
                            f'shipped recipes: {list_recipes()}')
