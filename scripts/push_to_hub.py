"""Publish a fine-tuned dropres folder to the Hugging Face Hub; same as the ``dropres-push`` command."""
import sys

from timm_dropres.cli.push import main

if __name__ == '__main__':
    sys.exit(main())
