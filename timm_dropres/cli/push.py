"""``dropres-push``: publish a fine-tuned dropres folder to the Hugging Face Hub (see docs/hub.md).

A thin front end over ``timm_dropres.hub.push``; bad input is printed as one ``error:`` line (exit 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List

from huggingface_hub.errors import HfHubHTTPError

from ._parser import OneLineParser

__all__ = ['build_parser', 'main']


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog='dropres-push',
        description='Publish a run folder (config.json + model.safetensors, e.g. runs/pets/best) to the Hub with a '
                    'generated model card. The token comes from --token, else HF_TOKEN, else `hf auth login`.')
    p.add_argument('folder', help='folder written by the trainer or '
                                  'timm_dropres.models.hf_folder.save_pretrained_folder')
    p.add_argument('--repo-id', required=True, help='<user or org>/<name> on the Hub')
    p.add_argument('--token', default=None, help='Hub token with write access (default: HF_TOKEN or stored login)')
    p.add_argument('--private', action='store_true', help='create the repo as private (an existing repo is unchanged)')
    p.add_argument('--revision', default=None, help='branch to push to (created from main if missing)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing directly')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--overwrite-card', action='store_true', help='replace a README.md that is already on the Hub')
    p.add_argument('--license', default=None, help='card license (default: the config\'s pretrained_cfg license)')
    p.add_argument('--base-model', default=None, help='Hub id of the starting weights (default: from summary.json)')
    p.add_argument('--dataset', default=None, help='Hub dataset id or name (default: from summary.json)')
    p.add_argument('--dry-run', action='store_true', help='write exactly what would be uploaded to --out-dir')
    p.add_argument('--out-dir', default=None, help='where --dry-run writes the repo contents (new or empty)')
    p.add_argument('-q', '--quiet', action='store_true', help='warnings and errors only')
    return p


def main(argv: List[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format='%(levelname)s %(message)s')
    from ..hub.push import PushError, push  # after parsing: --help stays fast
    from ._config_args import flag_message

    try:
        result = push(args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                      create_pr=args.create_pr, commit_message=args.commit_message,
                      overwrite_card=args.overwrite_card, dry_run=args.dry_run, out_dir=args.out_dir,
                      license=args.license, base_model=args.base_model, dataset=args.dataset)
    except (PushError, FileNotFoundError) as e:
        print(f'error: {flag_message(e)}', file=sys.stderr)
        return 2
    except HfHubHTTPError as e:
        print(f'error: the Hub refused the upload: {e}', file=sys.stderr)
        return 1
    where = result.out_dir if result.dry_run else (result.pr_url or result.commit_url or result.repo_id)
    print(f'{"dry run: wrote" if result.dry_run else "published"} {", ".join(result.files)} -> {where}')
    if not result.dry_run and result.card == 'kept':
        print('kept the README.md already on the Hub (--overwrite-card replaces it)')
    print(f'load it with: timm.create_model(\'hf-hub:{result.repo_id}\', pretrained=True)')
    print('maintainers: to make it a published tag, merge this into timm_dropres/published.json, '
          'naming the tag (docs/hub.md):')
    print(json.dumps({result.architecture: {'<tag>': result.registry_entry}}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
