#!/usr/bin/env python3
"""Re-analyse the first dropout-placement ablation from its run records: ``dropres-ablate --config ... --report-only``.

A thin CLI over ``timm_dropres.research.ablation`` and ``research.report``: it reads the ablation's YAML and
its per-run JSONs and rewrites ``<out-dir>/<stem>.{csv,md,png}``; ``make ablate`` re-makes the committed
under-fitting report (docs/results/underfit/) this way. It trains nothing: since issue 19 every study trains
through the product's trainer with ``dropres-study SPEC.yaml`` (configs/studies/*.yaml).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

from ..research import ablation, report
from ._parser import OneLineParser
from ._study import REPLACED_BY_STUDY, load_config, runs_line


def _train_size(data: ablation.DataSpec) -> str:
    k = len(data.classes) if data.classes else 10
    if data.train_per_class:
        return f'{data.train_per_class} per class x {k} classes = {data.train_per_class * k}'
    return str(data.train_subset or 6000 * k)


def _header(spec: ablation.AblationSpec, config: str, records: list, skipped: dict, argv: List[str],
            title: str) -> str:
    sch, data = spec.schedule, spec.data
    shown = shlex.join(argv)
    lines = [
        f'# {title} (generated)', '',
        f'Command: `python scripts/ablate.py {shown}` (spec: `{config}`).', '',
        f'- rates: residual p = {spec.res_drop_rate}, head p = {spec.head_drop_rate}; seeds {list(spec.seeds)}',
        f'- data: Fashion-MNIST, {_train_size(data)} training images (subset seed {data.data_seed}), '
        f'{data.test_subset or 10000} test images; variance shift on {data.vs_images} unaugmented training images',
        f'- schedule: {sch.epochs} epochs, batch {sch.batch_size}, {sch.opt} lr {sch.lr} wd {sch.weight_decay} '
        f'momentum {sch.momentum}, {sch.sched} (warmup {sch.warmup_epochs}), augment={sch.augment}'
        + (f'; test NLL curve every {sch.curve_every} epochs on {sch.curve_images} test images' if sch.curve_every
           else ''),
        runs_line(records),
        '- statistics: every configuration runs the same seeds (same initial weights, data order and '
        'augmentation), so comparisons are paired over seeds: mean difference, 95 % t interval, paired t-test, '
        f'Holm-corrected within each table column; `*` = significant at {spec.alpha:g} after correction',
    ]
    for arch in spec.architectures:
        kw = ', '.join(f'{k}={v!r}' for k, v in arch.model_kwargs.items())
        stem = f', stem stride {arch.stem_stride}, no max-pool' if arch.stem_stride else ''
        lines.append(f'- `{arch.name}`: `timm.create_model({arch.model!r}{", " + kw if kw else ""})`{stem}. '
                     f'{arch.label}')
        for name, why in skipped.get(arch.name, {}).items():
            lines.append(f'  - `{name}` not run: {why}')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Rewrite the report of a dropout-placement ablation from its run JSONs (no training).

    Reads the specification (for the report's header and the configurations to show) and every run JSON
    under the runs folder, then rewrites ``<out-dir>/<stem>.{csv,md,png}``; text below the report's keep marker
    survives. ``--report-only`` is required: this command no longer trains (``dropres-study`` does).

    Args:
        argv: command-line arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 if there is no run JSON.

    Raises:
        SystemExit: from argparse, for ``--help``, invalid arguments, a missing ``--report-only`` or an invalid
            specification (status 2).
        ValueError: if a run JSON cannot be read.

    Example:
        >>> exit_code = main(['--config', 'configs/ablation_fmnist.yaml', '--report-only'])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    p = OneLineParser(prog='dropres-ablate', description=__doc__.splitlines()[0])
    p.add_argument('--config', required=True,
                   help='ablation YAML, or a shipped recipe\'s name (e.g. ablation_fmnist)')
    p.add_argument('--out-dir', default='docs/results', help='where <stem>.{csv,md,png} go')
    p.add_argument('--runs-dir', default=None, help='per-run JSONs (default: <out-dir>/<stem>_runs)')
    p.add_argument('--title', default='Dropout-placement ablation on Fashion-MNIST', help='report title')
    p.add_argument('--stem', default='ablation', help='report file names: <out-dir>/<stem>.{csv,md,png}')
    p.add_argument('--report-only', action='store_true',
                   help='rewrite the report from existing run JSONs (required: this command trains nothing)')
    args = p.parse_args(argv)
    if not args.report_only:
        p.error(f'dropres-ablate no longer trains. {REPLACED_BY_STUDY} To re-analyse existing run JSONs, add '
                '--report-only.')

    spec = load_config(p, args.config, ablation.load_spec)
    out_dir = Path(args.out_dir)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out_dir / f'{args.stem}_runs'
    skipped = {a.name: ablation.configs_for(a, spec.configs)[1] for a in spec.architectures}
    records = ablation.read_records(runs_dir)
    if not records:
        print(f'no run JSONs under {runs_dir}', file=sys.stderr)
        return 1
    names = {(a.name, c) for a in spec.architectures for c in spec.configs}
    records = [r for r in records if (r['arch'], r['config']) in names]
    paths = report.write_report(records, out_dir, stem=args.stem, order=ablation.CONFIG_ORDER, alpha=spec.alpha,
                                header=_header(spec, args.config, records, skipped, argv, args.title))
    print('wrote ' + ', '.join(str(v) for v in paths.values()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
