"""The first ablation's run records: one JSON per (architecture, configuration, seed), read back for its report.

The runs that wrote them trained on a private loop that the package no longer has (issue 19: every study now
runs through the trainer, with ``dropres-study``); the records committed under
``docs/results/underfit/runs/`` are re-analysed from here by ``dropres-ablate --report-only``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

from ...files import read_json

__all__ = ['read_records']


def read_records(runs_dir: str | os.PathLike) -> List[Dict[str, Any]]:
    """Read every run record under ``runs_dir``, to re-make the report without training.

    Args:
        runs_dir: the folder of ``<arch>/<config>_seed<seed>.json`` files; a missing folder gives no records.

    Returns:
        The records, sorted by path.

    Raises:
        ValueError: if a record cannot be read or is not valid JSON.
    """
    return [read_json(p, 'run record') for p in sorted(Path(runs_dir).glob('*/*.json'))]
