"""Checkpoint folders of a fine-tuning run: names, listing, lookup and the trainer-state file.

A run folder holds ``checkpoints/step_<global step>/`` folders, each written to a dot-prefixed temporary
name and renamed when complete, so a listed checkpoint is always whole. accelerate writes the model,
optimizer, scaler and RNG states into it; the trainer adds ``trainer_state.json`` (and the EMA weights).
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from ..errors import OptionMessage

__all__ = ['OUTPUT_ARTIFACTS', 'RUN_LOCK', 'ARGS_FILE', 'SUMMARY_CSV', 'CKPT_DIR', 'CKPT_PREFIX', 'STATE_FILE',
           'EMA_FILE', 'CheckpointError', 'list_checkpoints', 'find_checkpoint', 'read_state']

#: What a run writes into --output-dir; --overwrite removes exactly these, nothing else.
OUTPUT_ARTIFACTS = ('checkpoints', 'best', 'last', 'summary.json', 'summary.csv', 'args.yaml', 'logs')
#: the run folder's lock file (:mod:`timm_dropres.training.lock`): not an output, never removed by --overwrite
RUN_LOCK = '.dropres-run.lock'
#: the resolved options of the run (YAML, as timm train.py) and its per-epoch metrics (CSV)
ARGS_FILE = 'args.yaml'
SUMMARY_CSV = 'summary.csv'
CKPT_DIR = 'checkpoints'
STATE_FILE = 'trainer_state.json'
EMA_FILE = 'ema.safetensors'
CKPT_PREFIX = 'step_'


class CheckpointError(OptionMessage, RuntimeError):
    """A checkpoint that cannot be resumed: missing, corrupt, or from a different model.

    The message names options by their field names (:class:`~timm_dropres.errors.OptionMessage`).
    """

    @classmethod
    def corrupt(cls, ckpt: Path, reason: str, *options: str) -> CheckpointError:
        """The error for a damaged checkpoint, naming the older complete checkpoints of its run to resume instead.

        Args:
            ckpt: the checkpoint folder.
            reason: what is wrong with it (its first line is kept).
            *options: the options ``reason`` names; ``reason`` is then a template whose fields ``{2}``, ``{3}``...
                are those options (``{0}``/``{1}`` are taken by the hint). Without options it is shown as it is.

        Returns:
            The error (to raise).
        """
        run = ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else None
        older = [p for p in list_checkpoints(run) if p.name < ckpt.name] if run is not None else []
        if older:
            hint = ('; older complete checkpoints of this run: {older}. Resume the newest of them into a new folder: '
                    '{0} {newest} {1} <new folder>')
        else:
            hint = '; this run has no older checkpoint to fall back to'
        lines = reason.strip().splitlines() or ['']
        reason = lines[0] if len(lines[0]) <= 300 else lines[0][:300] + '...'  # torch's messages run for paragraphs
        return cls('checkpoint {ckpt} is corrupt or incomplete: ' + (reason if options else '{reason}') + hint,
                   'resume', 'output_dir', *options, ckpt=ckpt, reason=reason, older=[p.name for p in older],
                   newest=older[-1] if older else None)

def list_checkpoints(run_dir: str | os.PathLike) -> List[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones are dot-prefixed temp folders).

    Args:
        run_dir: the run folder.

    Returns:
        The ``checkpoints/step_*`` folders, by step.
    """
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from ``path``: itself, or the latest checkpoint of a run folder.

    Args:
        path: a checkpoint folder or a run folder (the ``resume`` option).

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: ``path`` does not exist, holds no checkpoint, or is an incomplete checkpoint (a
            ``.tmp-`` folder of an interrupted write, or a checkpoint without its trainer state).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError('{0} {path} does not exist', 'resume', path=p)
    if p.name.startswith(f'.tmp-{CKPT_PREFIX}'):
        raise CheckpointError('{0} {path} is a checkpoint whose write was interrupted (a .tmp- folder); resume the '
                              'run folder {run} or one of its {prefix}* checkpoints', 'resume', path=p,
                              run=p.parent.parent, prefix=CKPT_PREFIX)
    if (p / STATE_FILE).is_file():
        return p
    if p.name.startswith(CKPT_PREFIX) and p.parent.name == CKPT_DIR:
        raise CheckpointError.corrupt(p, f'{STATE_FILE} is missing')
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError('{0} {path}: no checkpoints found (expected {path}/{dir}/{prefix}*/{state}); was the run '
                              'stopped before its first checkpoint?', 'resume', path=p, dir=CKPT_DIR,
                              prefix=CKPT_PREFIX, state=STATE_FILE)
    return ckpts[-1]


#: trainer_state.json fields that must be non-negative integers, and those that must be numbers
_STATE_COUNTS = ('epoch', 'batches_done', 'global_step', 'epoch_loss_batches', 'train_images', 'num_processes')
_STATE_NUMBERS = ('epoch_loss_sum', 'train_time_s')


def _state_problems(state: Any) -> List[str]:
    if not isinstance(state, dict):
        return [f'a JSON {type(state).__name__}, not an object']
    problems = []
    for k in _STATE_COUNTS:
        v = state.get(k, 0 if k not in ('epoch', 'batches_done', 'global_step') else None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.append(f'{k}={v!r} (expected a non-negative integer)')
    for k in _STATE_NUMBERS:
        v = state.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f'{k}={v!r} (expected a finite number)')
    if not isinstance(state.get('history', []), list):
        problems.append('history is not a list')
    if not isinstance(state.get('best') or {}, dict):
        problems.append('best is not an object')
    for k in ('config', 'identity', 'data', 'resumes'):
        if state.get(k) is not None and not isinstance(state[k], (dict, list)):
            problems.append(f'{k} is not an object')
    return problems


def read_state(ckpt: Path) -> Dict[str, Any]:
    """The trainer state of checkpoint ``ckpt``, checked field by field.

    Args:
        ckpt: the checkpoint folder.

    Returns:
        The parsed ``trainer_state.json``.

    Raises:
        CheckpointError: the file is missing, not valid JSON, or not a trainer state; the message names the
            older complete checkpoints of the run.
    """
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError.corrupt(ckpt, f'cannot read {STATE_FILE} ({e})') from e
    problems = _state_problems(state)
    if problems:
        raise CheckpointError.corrupt(ckpt, f'{STATE_FILE} is not a trainer state: {"; ".join(problems)}')
    return state


def _mark_rng() -> Dict[str, Any]:
    """Put every generator accelerate restores into a fresh random state, and return those states."""
    seed = int.from_bytes(os.urandom(8), 'little') & (2 ** 63 - 1)
    random.seed(seed)
    np.random.seed(seed & (2 ** 32 - 1))
    torch.manual_seed(seed)
    marker: Dict[str, Any] = dict(python=random.getstate(), numpy=np.random.get_state()[1].copy(),
                                  torch=torch.get_rng_state())
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        marker['cuda'] = torch.cuda.get_rng_state_all()
    return marker


def _rng_restored(marker: Dict[str, Any]) -> bool:
    """True when no generator is still in its marker state (``acc.load_state`` restored them all)."""
    if random.getstate() == marker['python'] or np.array_equal(np.random.get_state()[1], marker['numpy']):
        return False
    if torch.equal(torch.get_rng_state(), marker['torch']):
        return False
    return 'cuda' not in marker or not any(
        torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), marker['cuda'], strict=True))
