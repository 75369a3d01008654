"""``dropres-transfer``: replaced by ``dropres-study`` (issue 19); it says so and what to run instead.

The first transfer study pretrained and fine-tuned on a private loop of the package. The package now keeps one
training loop, the trainer's, and the transfer study is a spec of the study engine
(``configs/studies/transfer.yaml``, with its ``pretrain`` stage). The first study's per-run records were never
committed, so its report (docs/results/transfer/) cannot be re-made; its spec is
``configs/study_transfer.yaml`` at commit 517010d.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ._study import REPLACED_BY_STUDY

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    """Say that ``dropres-transfer`` was replaced and by what; do nothing else.

    Args:
        argv: ignored (any arguments); present so the console script keeps its signature.

    Returns:
        2, the usage-error status: the command no longer runs anything.
    """
    print(f'dropres-transfer: error: this command was replaced. {REPLACED_BY_STUDY} The transfer study is '
          'configs/studies/transfer.yaml (make study-transfer).', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
