"""Thin wrapper: `python scripts/finetune.py ...` == `dropres-finetune ...` (works under `accelerate launch`)."""
import sys

from timm_dropres.cli.finetune import main

if __name__ == '__main__':
    sys.exit(main())
