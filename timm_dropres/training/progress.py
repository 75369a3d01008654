"""What a run reports while it trains: trackers, the progress bar, the per-epoch CSV and the versions it ran with."""
from __future__ import annotations

import csv
import io
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, TextIO

import timm
import torch
from accelerate import Accelerator

from .. import __version__
from ..errors import OptionError
from ..files import write_text_atomic
from .config import FinetuneConfig

__all__ = ['progress_bar', 'write_history_csv']


def _trackers(log_with: str | None) -> Any:
    if not log_with:
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available
    need = ['tensorboard', 'wandb'] if log_with == 'all' else [log_with]
    avail = dict(tensorboard=is_tensorboard_available(), wandb=is_wandb_available())
    missing = [t for t in need if not avail.get(t, False)]
    if log_with != 'all' and missing:
        raise OptionError('{0} {value}: {missing} is not installed (pip install {missing})', 'log_with',
                          value=log_with, missing=missing[0])
    return [t for t in need if avail.get(t, False)] or None


def _flat_config(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Tracker hparams accept scalars only."""
    out = {}
    for k, v in asdict(cfg).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _progress(cfg: FinetuneConfig, acc: Accelerator, total: int, initial: int, desc: str) -> Any:
    if cfg.progress is False or not acc.is_local_main_process:
        return None
    bar = progress_bar(total=total, initial=initial, desc=desc, enabled=cfg.progress)
    return None if bar.disable else bar  # no bar: the loop skips the postfix's loss.item() syncs too


def progress_bar(*, total: int, initial: int = 0, desc: str = '', enabled: bool | None = None,
                 file: TextIO | None = None) -> Any:
    """A tqdm bar that draws on a terminal and stays silent on a file or pipe.

    Args:
        total: steps in the bar.
        initial: steps already done (a resumed epoch).
        desc: the bar's label.
        enabled: True: always draw; False: never; None: only when ``file`` is a terminal (tqdm's ``disable=None``).
        file: where to draw (default: stderr).

    Returns:
        The tqdm bar (a disabled one does nothing on ``update``/``close``).
    """
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=file or sys.stderr,
                disable=None if enabled is None else not enabled)


def write_history_csv(path: Path, history: List[Dict[str, Any]]) -> None:
    """The per-epoch metrics as CSV (one row per epoch, a column per metric), written atomically.

    Args:
        path: the file (``summary.csv`` in the run folder).
        history: the trainer's per-epoch rows, oldest first.
    """
    columns: List[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buf.getvalue())


def _versions() -> Dict[str, str]:
    import accelerate
    return dict(timm_dropres=__version__, timm=timm.__version__, torch=torch.__version__,
                accelerate=accelerate.__version__, python=platform.python_version(), platform=sys.platform)
