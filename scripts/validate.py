"""Thin wrapper: `python scripts/validate.py ...` == `dropres-validate ...` (works under `accelerate launch`)."""
import sys

from timm_dropres.cli.validate import main

if __name__ == '__main__':
    sys.exit(main())
