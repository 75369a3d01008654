"""What the first studies' CLIs (``dropres-ablate``, ``dropres-transfer``) share: recipe lookup, report lines, and
the pointer to ``dropres-study``, which replaced their training."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List, TypeVar

from ..recipes import find_recipe

__all__ = ['REPLACED_BY_STUDY', 'find_config', 'load_config', 'runs_line']

S = TypeVar('S')

#: what replaced the first studies' training loops (issue 19): one sentence, quoted by both old commands
REPLACED_BY_STUDY = ('Every study now trains through the dropres-finetune trainer with dropres-study: '
                     'dropres-study configs/studies/{overfit,transfer,underfit}.yaml --workers 2 --threads 1 '
                     '--resume (or make study-overfit, study-transfer, study-underfit), and '
                     'dropres-study SPEC --report-only re-analyses its records.')


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


def _recorded(records: List[Dict[str, Any]], key: str) -> str:
    return ', '.join(sorted({str(r.get(key, '?')) for r in records}))


def runs_line(records: List[Dict[str, Any]]) -> str:
    """The report header's line on how many runs took how long, on what: as the records say, not this machine.

    Args:
        records: the run records (each with ``wall_s``; ``threads``, ``torch`` and ``machine`` when recorded).

    Returns:
        One markdown list item.
    """
    total = sum(r['wall_s'] for r in records)
    return (f'- runs: {len(records)}, sum of per-run wall times {total / 60:.1f} min (torch threads per run: '
            f'{_recorded(records, "threads")}; torch {_recorded(records, "torch")}, {_recorded(records, "machine")} '
            'CPU, no GPU)')
