"""Thin wrapper: `python scripts/analyze.py ...` == `dropres-analyze ...`."""
import sys

from timm_dropres.cli.analyze import main

if __name__ == '__main__':
    sys.exit(main())
