"""``dropres-finetune``: flags (or a YAML ``--config``) -> :func:`timm_dropres.training.trainer.finetune`.

Run directly for one process, or under ``accelerate launch`` for many.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from ..training.build import resolve_model
from ..training.checkpoints import CheckpointError
from ..training.config import FinetuneConfig
from ..training.data import DataError
from ..training.runs import OutputDirError, TrainingDiverged
from ..training.trainer import finetune
from ._config_args import flag_message, parse_checked

__all__ = ['main']


def main(argv: Sequence[str] | None = None) -> int:
    # the options and the model are checked here, once: a bad one is a usage error naming its flag
    cfg, ref = parse_checked(FinetuneConfig, argv, 'Fine-tune a timm (dropres) model with accelerate.',
                             'dropres-finetune', resolve_model, recipes=True)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    logging.getLogger('accelerate').setLevel(logging.WARNING)  # per-file checkpoint chatter
    try:
        summary = finetune(cfg, ref=ref)
    except (DataError, CheckpointError, OutputDirError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f'dropres-finetune: error: {flag_message(e)}', file=sys.stderr)
        return 2
    except (TrainingDiverged, OSError) as e:  # a run that failed (diverged, disk full): exit 1, never 0
        print(f'dropres-finetune: error: {flag_message(e)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the shell's 128 + SIGINT
        print(f'dropres-finetune: interrupted (Ctrl-C); nothing half-written is left, and --resume {cfg.output_dir} '
              'continues from the latest checkpoint', file=sys.stderr)
        return 130
    return 0 if summary is not None else 1


if __name__ == '__main__':
    sys.exit(main())
