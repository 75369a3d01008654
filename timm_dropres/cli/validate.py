"""``dropres-validate``: top-1/top-5, loss and per-class accuracy of a model on a dataset split."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from ..training.config import ValidateConfig
from ..training.data import DataError
from ..training.evaluate import validate
from ._config_args import flag_message, parse_config

__all__ = ['main']


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(ValidateConfig, argv, 'Evaluate a timm (dropres) model on a dataset split.', 'dropres-validate')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    logging.getLogger('accelerate').setLevel(logging.WARNING)  # per-file checkpoint chatter
    try:
        validate(cfg)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f'dropres-validate: error: {flag_message(e)}', file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the results file cannot be written
        print(f'dropres-validate: error: {flag_message(e)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the shell's 128 + SIGINT
        print('dropres-validate: interrupted (Ctrl-C); nothing was written', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
