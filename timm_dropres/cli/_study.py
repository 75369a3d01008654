"""What the study CLIs (``dropres-ablate``, ``dropres-transfer``) share: run flags, recipe lookup, report lines."""
from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any, Callable, Dict, List, TypeVar

import torch

from ..recipes import find_recipe

__all__ = ['add_run_args', 'find_config', 'load_config', 'runs_line']

S = TypeVar('S')


def add_run_args(p: argparse.ArgumentParser, *, threads: int) -> None:
    """Add ``--threads`` (default ``threads``), ``--only-arch``, ``--report-only`` and ``--fmnist-root``."""
    p.add_argument('--threads', type=int, default=threads, help='torch intra-op threads')
    p.add_argument('--only-arch', nargs='+', default=None, help='run only these architecture names')
    p.add_argument('--report-only', action='store_true', help='rewrite the report from existing run JSONs')
    p.add_argument('--fmnist-root', default=None, help='folder with the Fashion-MNIST idx files')


def find_config(p: argparse.ArgumentParser, name: str) -> Path:
    """The YAML behind ``--config``: a path, or a shipped recipe's name; else a parser error naming the choices."""
    try:
        return find_recipe(name)
    except FileNotFoundError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits


def load_config(p: argparse.ArgumentParser, name: str, load: Callable[[Path], S]) -> S:
    """The study specification behind ``--config``, read by the library's ``load``; a bad one is a usage error.

    Args:
        p: the CLI's parser (its ``error`` exits with status 2).
        name: the ``--config`` value: a path, or a shipped recipe's name.
        load: the library's reader, e.g. ``ablation.load_spec``; its ``ValueError`` names the file and the key.

    Returns:
        The specification.
    """
    path = find_config(p, name)
    try:
        return load(path)
    except (ValueError, FileNotFoundError) as e:
        p.error(f'--config: {e}')
        raise  # unreachable: p.error exits


def runs_line(records: List[Dict[str, Any]]) -> str:
    """The report header's line on how many runs took how long, on what."""
    total = sum(r['wall_s'] for r in records)
    return (f'- runs: {len(records)}, sum of per-run wall times {total / 60:.1f} min (torch threads per run: '
            f'{records[0].get("threads", "?")}; torch {torch.__version__}, {platform.machine()} CPU, no GPU)')
