"""Thin wrapper: `python scripts/study.py ...` == `dropres-study ...`."""
import sys

from timm_dropres.cli.study import main

if __name__ == '__main__':
    sys.exit(main())
