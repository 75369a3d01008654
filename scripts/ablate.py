"""Thin wrapper: `python scripts/ablate.py ...` == `dropres-ablate ...`."""
import sys

from timm_dropres.cli.ablate import main

if __name__ == '__main__':
    sys.exit(main())
