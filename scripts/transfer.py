"""Thin wrapper: `python scripts/transfer.py ...` == `dropres-transfer ...`."""
import sys

from timm_dropres.cli.transfer import main

if __name__ == '__main__':
    sys.exit(main())
