"""Checkpoint folders of a fine-tuning run: names, listing, lookup and the trainer-state file.

A run folder holds ``checkpoints/step_<global step>/`` folders, each written to a dot-prefixed temporary
name and renamed when complete, so a listed checkpoint is always whole. accelerate writes the model,
optimizer, scaler and RNG states into it; the trainer adds ``trainer_state.json`` (and the EMA weights).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

__all__ = ['OUTPUT_ARTIFACTS', 'ARGS_FILE', 'SUMMARY_CSV', 'CKPT_DIR', 'CKPT_PREFIX', 'STATE_FILE', 'EMA_FILE',
           'CheckpointError', 'list_checkpoints', 'find_checkpoint', 'read_state']

#: What a run writes into --output-dir; --overwrite removes exactly these, nothing else.
OUTPUT_ARTIFACTS = ('checkpoints', 'best', 'last', 'summary.json', 'summary.csv', 'args.yaml', 'logs')
#: the resolved options of the run (YAML, as timm train.py) and its per-epoch metrics (CSV)
ARGS_FILE = 'args.yaml'
SUMMARY_CSV = 'summary.csv'
CKPT_DIR = 'checkpoints'
STATE_FILE = 'trainer_state.json'
EMA_FILE = 'ema.safetensors'
CKPT_PREFIX = 'step_'


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: missing, corrupt, or from a different model."""

def list_checkpoints(run_dir: str | os.PathLike) -> List[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones are dot-prefixed temp folders)."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from ``path``: itself, or the latest checkpoint of a run folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f'--resume {p} does not exist')
    if (p / STATE_FILE).is_file():
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError(f'--resume {p}: no checkpoints found (expected {p}/{CKPT_DIR}/{CKPT_PREFIX}*/'
                              f'{STATE_FILE}); was the run stopped before its first checkpoint?')
    return ckpts[-1]


def read_state(ckpt: Path) -> Dict[str, Any]:
    """The trainer state of checkpoint ``ckpt``.

    Raises:
        CheckpointError: the file is missing or not valid JSON.
    """
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f'checkpoint {ckpt} is corrupt: cannot read {STATE_FILE} ({e})') from e
