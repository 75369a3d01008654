"""Figure 1: inference overhead. Eval-mode img/s of ``<arch>_dropres`` vs ``<arch>`` with the same weights.

In eval mode every ``ResidualDropout`` returns its input untouched, so the dropres model should cost
nothing. Besides the timed ratio (target >= 0.99) each row checks two noise-free facts: the outputs
are bit-identical, and the dropres model dispatches no more ATen ops than the base (ResNetV2's head
even loses one: its p=0 ``nn.Dropout`` still dispatches ``aten::dropout`` in eval, the dropres head
skips the kernel in Python).

    python benchmarks/inference.py                      # CPU defaults (128 px, see --help)
    python benchmarks/inference.py --device cuda --dtype bfloat16 --img-size 224 --batch-sizes 64 256
"""
from __future__ import annotations

import argparse

import timm
import torch

try:
    from benchmarks import common as C
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]

import timm_dropres  # noqa: F401  (registers the *_dropres models)

TARGET = 0.99
ARCHS = ('resnet18', 'resnet50', 'resnext50_32x4d', 'resnetv2_50')
SMOKE = ['--threads', '1',
         '--archs', 'test_resnet', '--batch-sizes', '2', '--img-size', '32', '--reps', '2', '--warmup', '1',
         '--iters', '1']


def build_pair(arch: str, device: torch.device, channels_last: bool, dtype: torch.dtype,
               compile_: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``<arch>`` and ``<arch>_dropres`` (default rates) in eval mode, holding the same weights."""
    base = timm.create_model(arch).eval()
    dropres = timm.create_model(arch + timm_dropres.SUFFIX).eval()
    dropres.load_state_dict(base.state_dict(), strict=True)
    base = C.prepare(base, device, channels_last, dtype)
    dropres = C.prepare(dropres, device, channels_last, dtype)
    if compile_:
        base, dropres = torch.compile(base), torch.compile(dropres)
    return base, dropres


def _forward(model: torch.nn.Module, x: torch.Tensor):
    @torch.inference_mode()
    def fwd() -> torch.Tensor:
        return model(x)
    return fwd


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    headers = ['arch', 'layout', 'batch', 'base img/s', 'dropres img/s',
               f'ratio (target >= {TARGET})', 'met', 'bit-identical output', 'ATen ops base / dropres']
    rows, records = [], []
    for arch in args.archs:
        for cl in C.layouts(args.channels_last):
            base, dropres = build_pair(arch, device, cl, dtype, args.compile)
            for bs in args.batch_sizes:
                x, _ = C.make_batch(bs, args.img_size, 1000, device, cl, dtype)

                fwd, fwd_d = _forward(base, x), _forward(dropres, x)
                same_out = torch.equal(fwd(), fwd_d())
                # compiled graphs hide their ops from the dispatcher; count on eager modules only
                ops = None if args.compile else (C.count_aten_ops(fwd), C.count_aten_ops(fwd_d))
                ops_cell = 'n/a (compiled)' if ops is None else f'{ops[0]} / {ops[1]}'
                t = C.interleaved({'base': fwd, 'dropres': fwd_d}, device=device, reps=args.reps,
                                  warmup=args.warmup, iters=args.iters,
                                  clock=args.clock)
                tb, td = C.throughput(t['base'], bs), C.throughput(t['dropres'], bs)
                ratio = C.paired_ratio(t['dropres'], t['base'])
                layout = 'channels_last' if cl else 'contiguous'
                rows.append([arch, layout, bs, C.fmt_stat(tb), C.fmt_stat(td), C.fmt_ratio(ratio),
                             C.ratio_verdict(ratio, TARGET), same_out, ops_cell])
                records.append(dict(arch=arch, layout=layout, batch=bs, base=tb, dropres=td, ratio=ratio,
                                    same_output=same_out, ops=ops))
            del base, dropres
    title = (f'### Figure 1: inference overhead (eval img/s, {args.dtype}, {args.img_size}px'
             f'{", torch.compile" if args.compile else ""}; img/s: median (min–max) of {args.reps} interleaved reps; '
             f'{C.ci_note(args.reps)}; {args.clock} clock)')
    return '\n'.join([title, '', C.environment(device), '', C.markdown_table(headers, rows)]), records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0], archs=ARCHS, batch_sizes=(1, 8), img_size=128, reps=5,
                      smoke_help='tiny run (test_resnet, 32 px, 2 reps) so tests keep the script alive')
    args = C.parse_args(p, argv, SMOKE)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return C.emit(args, *run(args), script='inference')


if __name__ == '__main__':
    raise SystemExit(main())
