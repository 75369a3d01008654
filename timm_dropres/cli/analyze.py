"""``dropres-analyze``: the paper's module tests from the command line (thin over ``timm_dropres.analysis``).

    dropres-analyze shift --model resnet18_dropres --positions none after_last_bn before_last_conv
    dropres-analyze shift --model local-dir:runs/x/best          # a trained model, measured as it is
    dropres-analyze block --form pre post --p 0.3 --mean 0.5
    dropres-analyze head --model preresnet20_cifar_dropres --data fmnist
Each subcommand prints a table; ``--plot FILE.png`` and ``--json FILE`` save the figure and the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ._parser import OneLineParser

__all__ = ['main']


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog='dropres-analyze', description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument('--plot', metavar='PNG', help='save a matplotlib figure here')
        sp.add_argument('--json', metavar='FILE', help='save the numbers as JSON here')
        sp.add_argument('--seed', type=int, default=0)

    s = sub.add_parser('shift', help='variance shift per BN layer for each residual dropout position')
    s.add_argument('--model', required=True, help='a *_dropres name (built fresh per position) or local-dir:<folder> '
                                                 'or any timm name (measured as built)')
    s.add_argument('--positions', nargs='+', default=['none', 'after_last_bn', 'before_last_conv'],
                   help="res_drop_pos values to compare ('none' = no residual dropout); *_dropres names only")
    s.add_argument('--res-drop-rate', type=float, default=0.3)
    s.add_argument('--data', default='gaussian', choices=('gaussian', 'fmnist'))
    s.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'), help="default: the model's")
    s.add_argument('--batches', type=int, default=4, help='batches for calibration and again for measurement')
    s.add_argument('--batch-size', type=int, default=16)
    s.add_argument('--calibrate', action=argparse.BooleanOptionalAction, default=None,
                   help='re-estimate BN statistics in train mode first (default: yes for names, no for local-dir:)')
    common(s)

    b = sub.add_parser('block', help='residual-block module test on Gaussian input, against the analytic prediction')
    b.add_argument('--form', nargs='+', default=['pre', 'post'], choices=('pre', 'post'))
    b.add_argument('--p', type=float, default=0.3)
    b.add_argument('--mean', type=float, default=0.5, help='input mean')
    b.add_argument('--std', type=float, default=1.0, help='input standard deviation')
    b.add_argument('--channels', type=int, default=16)
    b.add_argument('--size', type=int, default=16)
    b.add_argument('--batch-size', type=int, default=64)
    b.add_argument('--batches', type=int, default=8)
    common(b)

    h = sub.add_parser('head', help='dropout before vs after global pooling: variance over masks')
    h.add_argument('--model', help='also test the real feature maps of this model (timm name or local-dir:)')
    h.add_argument('--data', default='fmnist', choices=('gaussian', 'fmnist'))
    h.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'), help="default: the model's")
    h.add_argument('--images', type=int, default=64)
    h.add_argument('--p', type=float, default=0.3)
    h.add_argument('--masks', type=int, default=200)
    h.add_argument('--sizes', type=int, nargs='+', default=[1, 2, 4, 8], help='H = W of the synthetic maps')
    common(h)
    return p


def _model_input(model: Any, input_size: Sequence[int] | None) -> tuple[tuple[int, ...], Any, Any]:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)  # timm's own resolution: pretrained cfg, then defaults
    size = tuple(input_size) if input_size else tuple(cfg['input_size'])
    return size, cfg['mean'], cfg['std']


def _shift(args: argparse.Namespace) -> dict:
    import timm

    from ..models.reference import ModelRef
    from ..research import analysis as A
    name = args.model
    ref = ModelRef.parse(name)
    fresh = ref.source is None and ref.architecture.endswith('_dropres')
    probe = timm.create_model(name, pretrained=ref.loads_weights())
    size, mean, std = _model_input(probe, args.input_size)

    def batches(seed: int) -> list:
        return A.image_batches(args.data, args.batches, args.batch_size, size, mean=mean, std=std, seed=seed)

    calibrate = args.calibrate if args.calibrate is not None else not ref.is_folder
    if fresh:
        results = A.shift_by_position(name, args.positions, batches(args.seed + 1), batches(args.seed),
                                      res_drop_rate=args.res_drop_rate, seed=args.seed)
        if not calibrate:
            print('note: fresh models are always calibrated; --no-calibrate applies to trained models only')
    else:
        results = {'as built': A.variance_shift(probe, batches(args.seed + 1),
                                                calibrate_batches=batches(args.seed) if calibrate else None)}
    for pos, recs in results.items():
        print(A.format_shift_table(recs, title=f'{name}  position: {pos}  data: {args.data}  input: {size}'))
        print()
    summary = ', '.join(f'{k}: mean {A.shift_mean(v):.3f} max {A.shift_max(v):.3f}' for k, v in results.items())
    print('summary:', summary)
    if args.plot:
        A.plot_shift(results, args.plot, title=f'{name}: variance shift per BN ({args.data})')
    return {k: [r.as_dict() for r in v] for k, v in results.items()}


def _block(args: argparse.Namespace) -> dict:
    from ..research import analysis as A
    results = []
    for form in args.form:
        results += A.residual_block_test(form == 'pre', p=args.p, mean=args.mean, std=args.std,
                                         channels=args.channels, size=args.size, batch_size=args.batch_size,
                                         n_batches=args.batches, seed=args.seed)
    print(f'input N({args.mean:g}, {args.std:g}^2), p = {args.p:g}, {args.channels} channels, {args.size}x{args.size}')
    print(A.format_block_table(results))
    if args.plot:
        A.plot_block(results, args.plot)
    return {'results': [r.as_dict() for r in results]}


def _head(args: argparse.Namespace) -> dict:
    from ..research import analysis as A
    sweep = A.iid_head_sweep(args.sizes, p=args.p, n_masks=args.masks, seed=args.seed)
    print(f'independent positions, p = {args.p:g}, {args.masks} masks')
    print(f'{"H*W":>5}  {"ratio":>9}  {"exact":>9}  {"1/(H*W)":>9}')
    for r in sweep:
        print(f'{r.hw:5d}  {r.ratio:9.5f}  {r.ratio_pred:9.5f}  {r.ratio_iid:9.5f}')
    out: dict = {'iid': [r.as_dict() for r in sweep]}
    real = None
    if args.model:
        import timm

        from ..models.reference import ModelRef
        model = timm.create_model(args.model, pretrained=ModelRef.parse(args.model).loads_weights())
        size, mean, std = _model_input(model, args.input_size)
        batches = A.image_batches(args.data, max(1, args.images // 32), min(32, args.images), size,
                                  mean=mean, std=std, seed=args.seed)
        real = A.head_test_on_model(model, batches, p=args.p, n_masks=args.masks, seed=args.seed)
        print(f'\nreal feature maps: {args.model} on {args.data} {size}, H*W = {real.hw}')
        print(f'pooled-feature variance: before pool {real.pooled_var_before:.4g}, '
              f'after pool {real.pooled_var_after:.4g}, ratio {real.ratio:.4f} '
              f'(exact {real.ratio_pred:.4f}, 1/(H*W) {real.ratio_iid:.4f})')
        if real.logit_ratio is not None:
            print(f'logit variance ratio {real.logit_ratio:.4f} (exact {real.logit_ratio_pred:.4f})')
        out['real'] = dict(real.as_dict(), model=args.model, data=args.data, input_size=list(size))
    if args.plot:
        A.plot_head(sweep, args.plot, real=real, label=args.model or '')
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``dropres-analyze`` subcommand (``shift``, ``block`` or ``head``) and print its table.

    Seeds torch with ``--seed`` first, so fresh models get reproducible weights. ``--plot`` saves the
    figure and ``--json`` the numbers.

    Args:
        argv: command-line arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 if the test fails with a ``ValueError``, ``TypeError``,
        ``FileNotFoundError`` or ``RuntimeError`` (the message is printed to stderr).

    Raises:
        SystemExit: from argparse, for ``--help`` or invalid arguments.

    Example:
        >>> exit_code = main(['block', '--form', 'pre', '--p', '0.3'])  # doctest: +SKIP
    """
    args = _parser().parse_args(argv)
    import torch

    torch.manual_seed(args.seed)  # fresh models get reproducible weights
    try:
        out = {'shift': _shift, 'block': _block, 'head': _head}[args.cmd](args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f'dropres-analyze: error: {e}', file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        print(f'plot: {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
