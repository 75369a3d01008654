"""``dropres-audit MODEL``: where every dropout of a model sits and whether a BatchNorm consumes it.

    dropres-audit resnet50 --drop-rate 0.2        # timm's head dropout: after pooling
    dropres-audit resnet50_dropres                # every dropout at a guideline position
    dropres-audit local-dir:runs/x/best --strict  # exit 1 when a BatchNorm consumes dropped activations (CI gate)
    dropres-audit resnet51q --drop-block-rate 0.1 --json audit.json   # the table as JSON, for CI

Exit codes: 0 done (and, with --strict, no hazard), 1 --strict found a hazard, 2 the model could not be built
or traced. --json FILE writes the table's columns for every row (index, op, name, p, location, verdict, why),
plus active, hazard, consumer, path, note; the summary line as {"ok", "hazard", "off-guideline"}; and model,
input_shape, has_bn, hazards (docs/placement.md, "Reading the audit").
Thin over :func:`timm_dropres.audit.audit`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

import yaml

from ..checks import cut
from ..strict_yaml import safe_load_strict
from ._parser import OneLineParser

__all__ = ['main']


def _kwarg(text: str) -> tuple[str, Any]:
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'--kwarg takes KEY=VALUE, got {text!r}')
    key, value = text.split('=', 1)
    try:  # a key written twice in a mapping value is refused, as in --config files
        return key.replace('-', '_'), safe_load_strict(value)
    except yaml.YAMLError as e:  # argparse reports ArgumentTypeError in one line; a YAMLError was a traceback
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise argparse.ArgumentTypeError(f'--kwarg {cut(text)}: VALUE is not valid YAML ({problem})') from None


def _parser() -> argparse.ArgumentParser:
    from ..research.audit import describe_rules
    p = OneLineParser(prog='dropres-audit', description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n', 1)[1] + '\n' + describe_rules())
    p.add_argument('model', help='timm model name, or local-dir:<folder> with config.json + weights')
    p.add_argument('--drop-rate', type=float, help='timm drop_rate (head dropout)')
    p.add_argument('--res-drop-rate', type=float, help='*_dropres models: residual dropout rate')
    p.add_argument('--res-drop-pos', help='*_dropres models: auto, after_last_bn or before_last_conv')
    p.add_argument('--drop-path-rate', type=float, help='timm stochastic depth rate')
    p.add_argument('--drop-block-rate', type=float, help='timm DropBlock rate')
    p.add_argument('--kwarg', type=_kwarg, action='append', default=[], metavar='KEY=VALUE',
                   help='any other timm.create_model keyword (repeatable; VALUE parsed as YAML), '
                        'e.g. proj_drop_rate=0.1 or img_size=64')
    p.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                   help='trace input size (default: timm.data.resolve_model_data_config for the model)')
    p.add_argument('--strict', action='store_true', help='exit 1 when an active dropout is a variance-shift hazard')
    p.add_argument('--verbose', action='store_true', help='show the downstream path next to each note')
    p.add_argument('--json', metavar='FILE', help='also write the audit as JSON (same fields as the table)')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Audit where every dropout of a model sits and print the report (``dropres-audit``).

    The dropout options and ``--kwarg KEY=VALUE`` pairs go to ``timm.create_model``; ``--json`` also saves
    the audit. With ``--strict`` the command fails when an active dropout feeds a BatchNorm (a CI gate).

    Args:
        argv: command-line arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 with ``--strict`` when the audit finds variance-shift hazards, 2 if
        the model cannot be built or traced or the JSON file cannot be written (the message is printed
        to stderr).

    Raises:
        SystemExit: from argparse, for ``--help`` or invalid arguments.

    Example:
        >>> exit_code = main(['resnet50_dropres', '--strict'])  # doctest: +SKIP
    """
    args = _parser().parse_args(argv)
    from ..research.audit import AuditError, audit, format_report
    kwargs: Dict[str, Any] = dict(args.kwarg)
    for key in ('drop_rate', 'res_drop_rate', 'res_drop_pos', 'drop_path_rate', 'drop_block_rate'):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    try:
        report = audit(args.model, input_size=args.input_size, **kwargs)
    except AuditError as e:
        print(f'dropres-audit: error: {e}', file=sys.stderr)
        return 2
    print(format_report(report, verbose=args.verbose))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.as_dict(), indent=1))
        except OSError as e:
            print(f'dropres-audit: error: cannot write --json {args.json!r}: {e.strerror or e}', file=sys.stderr)
            return 2
    if args.strict and report.hazards:
        print(f'dropres-audit: --strict: {len(report.hazards)} variance-shift hazard(s)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
