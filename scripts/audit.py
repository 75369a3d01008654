"""Thin wrapper: `python scripts/audit.py ...` == `dropres-audit ...`."""
import sys

from timm_dropres.cli.audit import main

if __name__ == '__main__':
    sys.exit(main())
