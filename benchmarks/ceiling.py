"""Figure 5: compute ceiling. Achieved training FLOP/s as a fraction of a large matmul's FLOP/s.

The FLOPs of one train step (forward + backward; convolutions and matmuls) are counted by
``torch.utils.flop_counter.FlopCounterMode`` -- fvcore is not a dependency and timm has no counter of
its own -- and divided by the measured step time. The ceiling is a square matmul in the same dtype,
timed interleaved with the train steps, so both see the same machine state.

    python benchmarks/ceiling.py
    python benchmarks/ceiling.py --device cuda --dtype bfloat16 --img-size 224 --batch-sizes 128
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

try:
    from benchmarks import common as C
    from benchmarks import training as T
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]
    import training as T  # type: ignore[no-redef]

ARCHS = ('resnet50',)
SMOKE = ['--threads', '1',
         '--archs', 'test_resnet', '--batch-sizes', '2', '--img-size', '32', '--reps', '2', '--warmup', '1',
         '--iters', '1', '--matmul-size', '256']


def count_step_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward ops as dispatched)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    n = args.matmul_size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_flops = 2 * n ** 3
    rows, records = [], []
    for arch in args.archs:
        for cl in C.layouts(args.channels_last):
            layout = 'channels_last' if cl else 'contiguous'
            base, dropres = T.build_pair(arch, device, cl, args.compile, args.res_drop_rate)
            for bs in args.batch_sizes:
                x, y = C.make_batch(bs, args.img_size, T.NUM_CLASSES, device, cl)
                steps = {'base': T.make_step(base, x, y, device, dtype)[0],
                         'dropres': T.make_step(dropres, x, y, device, dtype)[0]}
                # count on the eager modules: FlopCounterMode sees the ops a compiled graph hides
                flops = {k: count_step_flops(T.make_step(getattr(m, '_orig_mod', m), x, y, device, dtype)[0])
                         for k, m in (('base', base), ('dropres', dropres))}
                cases = dict(steps, matmul=lambda: torch.mm(a, b))
                t = C.interleaved(cases, device=device, reps=args.reps, warmup=args.warmup, iters=args.iters,
                                  clock=args.clock)
                peak = C.Stat.of([mm_flops / s for s in t['matmul']])
                for name in ('base', 'dropres'):
                    achieved = C.Stat.of([flops[name] / s for s in t[name]])
                    frac = C.Stat.of([(flops[name] / s) / (mm_flops / m) for s, m in
                                      zip(t[name], t['matmul'], strict=True)])
                    rows.append([f'{arch}{"_dropres" if name == "dropres" else ""}', layout, bs,
                                 f'{flops[name] / bs / 1e9:.2f}', C.fmt_stat(C.Stat(*(v / 1e9 for v in (
                                     achieved.median, achieved.lo, achieved.hi))), 1),
                                 C.fmt_stat(C.Stat(peak.median / 1e9, peak.lo / 1e9, peak.hi / 1e9), 1),
                                 C.fmt_stat(frac, 3)])
                    records.append(dict(arch=arch, model=name, layout=layout, batch=bs, flops=flops[name],
                                        achieved=achieved, matmul=peak, fraction=frac))
            del base, dropres
    what = (f'{args.dtype}{" autocast" if args.dtype != "float32" else ""}, {args.img_size}px, '
            f'res_drop_rate {args.res_drop_rate}') + (
        ', torch.compile' if args.compile else '')
    title = (f'### Figure 5: compute ceiling (train-step FLOP/s vs a {n}x{n} {args.dtype} matmul; {what}; '
             f'median (min–max) of {args.reps} interleaved reps, {args.clock} clock)')
    headers = ['model', 'layout', 'batch', 'train GFLOP/img', 'achieved GFLOP/s', 'matmul GFLOP/s',
               'fraction of matmul']
    return '\n'.join([title, '', C.environment(device), '', C.markdown_table(headers, rows)]), records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0], archs=ARCHS, batch_sizes=(8,), img_size=112, reps=4,
                      smoke_help='tiny run (test_resnet, 32 px, 256x256 matmul) so tests keep the script alive',
                      channels_last='no')
    p.add_argument('--matmul-size', type=int, default=0,
                   help='side of the square ceiling matmul (default: 2048 on CPU, 8192 on CUDA)')
    T.add_res_drop_rate(p)
    args = C.parse_args(p, argv, SMOKE)
    if args.matmul_size < 0:
        p.error(f'--matmul-size must be >= 1, got {args.matmul_size}')
    if args.matmul_size == 0:
        args.matmul_size = 8192 if args.device == 'cuda' else 2048
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return C.emit(args, *run(args), script='ceiling')


if __name__ == '__main__':
    raise SystemExit(main())
