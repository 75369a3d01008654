#!/usr/bin/env python3
"""Transfer study on Fashion-MNIST: ``python scripts/transfer.py --config configs/study_transfer.yaml``.

A thin CLI over ``timm_dropres.transfer``: pretrains each network once (cached), fine-tunes every missing
(configuration, seed) through the real trainer (finished runs are skipped, so rerunning resumes), and rewrites
``<out-dir>/transfer.{csv,md,png}`` from all run JSONs.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..research import ablation, report, transfer
from ._parser import OneLineParser
from ._study import add_run_args, load_config, runs_line


def _header(spec: transfer.TransferSpec, config: str, records: list, skipped: dict, out: Path, argv: List[str]) -> str:
    ft, pre = spec.finetune, spec.pretrain
    shown = shlex.join(a for a in argv if a != '--report-only')
    lines = [
        '# Transfer study on Fashion-MNIST (generated)', '',
        f'Command: `python scripts/transfer.py {shown}` (spec: `{config}`).', '',
        f'- task: pretrain on classes {list(spec.source_classes)} (all their training images, no dropout, '
        f'{pre.epochs} epochs {pre.opt} lr {pre.lr}), fine-tune on {spec.shots} images per class of classes '
        f'{list(spec.target_classes)} ({spec.shots * len(spec.target_classes)} images), test the last weights on '
        f'all test images of those classes',
        f'- fine-tuning (the real trainer, `finetune()` with `pretrained_file`): {ft.epochs} epochs, batch '
        f'{ft.batch_size}, {ft.opt} lr {ft.lr} wd {ft.weight_decay}, cosine with {ft.warmup_epochs} warmup epoch, '
        f'label smoothing {ft.smoothing}, RandomResizedCrop scale {list(ft.scale)}, hflip {ft.hflip}',
        f'- rates: residual p = {spec.res_drop_rate}, head p = {spec.head_drop_rate} for every placement; '
        f'seeds {list(spec.seeds)} (a seed draws the few-shot subset and seeds the trainer: same new classifier, '
        'data order and augmentation for every configuration)',
        runs_line(records),
        '- statistics: paired over seeds: mean difference, 95 % t interval, paired t-test, Holm-corrected within '
        f'each table column; `*` = significant at {spec.alpha:g} after correction',
    ]
    for arch in spec.architectures:
        kw = ', '.join(f'{k}={v!r}' for k, v in arch.model_kwargs.items())
        pre_file = out / 'pretrained' / f'{arch.name}.json'
        pre_note = ''
        if pre_file.is_file():
            p = json.loads(pre_file.read_text())
            pre_note = f" Pretraining: {p['images']} images, final train loss {p['train_loss_last_epoch']:.4f}."
        lines.append(f'- `{arch.name}`: `timm.create_model({arch.model!r}{", " + kw if kw else ""})` at '
                     f'{arch.img_size}x{arch.img_size}. {arch.label}{pre_note}')
        for name, why in skipped.get(arch.name, {}).items():
            lines.append(f'  - `{name}` not run: {why}')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the transfer study described by a YAML file and write its report.

    Pretrains each architecture once (cached), fine-tunes every missing (configuration, seed) through the
    real trainer (finished runs are skipped, so rerunning resumes), then rewrites
    ``<out-dir>/transfer.{csv,md,png}`` from all run JSONs. ``--report-only`` skips training.

    Args:
        argv: command-line arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 if there is no run JSON under ``<out-dir>/runs``.

    Raises:
        SystemExit: from argparse, for ``--help``, invalid arguments or an invalid specification (status 2).
        ValueError: if an existing run JSON belongs to another specification.
        FileNotFoundError: if the Fashion-MNIST files are not found (when training).

    Example:
        >>> exit_code = main(['--config', 'configs/study_transfer.yaml', '--report-only'])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', required=True,
                   help='transfer-study YAML, or a shipped recipe\'s name (e.g. study_transfer)')
    p.add_argument('--out-dir', default='docs/results/transfer', help='report, runs/ and pretrained/ go here')
    add_run_args(p, threads=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    spec = load_config(p, args.config, transfer.load_transfer_spec)
    out = Path(args.out_dir)
    torch.set_num_threads(args.threads)
    skipped = transfer.skipped_configs(spec)
    if not args.report_only:
        t0 = time.time()
        data = transfer.load_transfer_data(spec, args.fmnist_root)
        transfer.run_transfer(spec, out, data, only_arch=args.only_arch, log=lambda s: print(s, flush=True))
        print(f'transfer pass done in {(time.time() - t0) / 60:.1f} min', flush=True)
    records = ablation.read_records(out / 'runs')
    if not records:
        print(f'no run JSONs under {out / "runs"}', file=sys.stderr)
        return 1
    paths = report.write_report(records, out, stem='transfer', order=ablation.CONFIG_ORDER, alpha=spec.alpha,
                                header=_header(spec, args.config, records, skipped, out, argv))
    print('wrote ' + ', '.join(str(v) for v in paths.values()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
