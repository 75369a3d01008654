"""Before/after: the dropout kernel inside ``ResidualDropout`` on CPU, train-step speed and memory.

On CPU, ``F.dropout`` is not fused: it draws a float mask with ``bernoulli_`` (slow, ~4x the cost of
``rand_like``), divides it, multiplies, and keeps the float mask for backward. This script swaps the
kernel of every ``ResidualDropout`` in ``<arch>_dropres`` (by re-typing the modules, like ``convert``)
and measures each variant against the same base model, interleaved, in one run:

* ``current``: the package's ``ResidualDropout`` (on CPU at p <= 0.125: the dropped positions drawn as
  geometric gaps, one scaling pass each way, int64 positions kept for backward; see
  ``timm_dropres.models.layers._cpu_dropout``).
* ``mask16_bool``: the kernel it replaced (issue 14): 16-bit uniforms sliced from 64-bit draws and a bool
  mask, multiplied in (a slow mixed-dtype path on CPU) and kept for backward.
* ``f_dropout``: ``F.dropout``, what ``ResidualDropout`` called before that.
* ``rand_ge``: ``noise = rand_like(x).ge_(p).div_(1 - p); x * noise`` -- one uniform draw per element,
  same float mask memory, same distribution.
* ``native``: ``torch.native_dropout`` -- what ``F.dropout`` already calls on CUDA; on CPU it keeps a
  bool mask (1 byte per element instead of 4) but is slower.
* ``rand_bool``: one uniform draw, a bool mask saved for backward, float multiplies (a custom
  ``autograd.Function``: fast and small, but not scriptable).

Target ratios as figures 2 and 3 (>= 0.98 speed, <= 1.02 memory).

    python benchmarks/dropout_impl.py --archs resnet50 --batch-sizes 16
"""
from __future__ import annotations

import argparse

import torch

try:
    from benchmarks import common as C
    from benchmarks import training as T
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]
    import training as T  # type: ignore[no-redef]

from timm_dropres import ResidualDropout

SMOKE = ['--threads', '1', '--archs', 'test_resnet', '--batch-sizes', '2', '--img-size', '32', '--reps', '2',
         '--warmup', '1', '--iters', '1']


class FDropout(ResidualDropout):
    """``F.dropout``: bernoulli_ float mask on CPU, kept for backward (the kernel before the fix)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.nn.functional.dropout(x, self.p, True)


class RandGeDropout(ResidualDropout):
    """Inverted dropout from one uniform draw per element (float mask, like F.dropout's CPU path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        noise = torch.rand_like(x).ge_(self.p).div_(1.0 - self.p)
        return x * noise


class NativeDropout(ResidualDropout):
    """``torch.native_dropout``: the fused op F.dropout uses on CUDA; a bool mask on every device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class _BoolMaskDropoutFn(torch.autograd.Function):
    """Uniform draw, bool mask saved for backward (1 byte per element), float multiply (fast on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand_like(x) >= p
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None


class RandBoolDropout(ResidualDropout):
    """One uniform draw per element and a bool mask: rand_ge's speed with native's memory (autograd.Function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _BoolMaskDropoutFn.apply(x, self.p)


class Mask16BoolDropout(ResidualDropout):
    """The previous CPU kernel: 16-bit uniforms (four per 64-bit draw) -> bool mask; ``x * mask`` (bool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        levels = 1 << 16
        drop = int(round(self.p * levels))
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        order = (0, 2, 3, 1) if channels_last else tuple(range(x.dim()))  # the mask in memory order
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
        keep = bits.view(torch.int16)[:x.numel()].view([x.shape[d] for d in order]) >= drop - levels // 2
        if channels_last:
            keep = keep.permute(0, 3, 1, 2)
        return (x * keep).mul_(levels / (levels - drop))


VARIANTS: dict[str, type[ResidualDropout]] = {
    'current': ResidualDropout, 'mask16_bool': Mask16BoolDropout, 'f_dropout': FDropout,
    'rand_ge': RandGeDropout, 'native': NativeDropout, 'rand_bool': RandBoolDropout}


def with_variant(model: torch.nn.Module, cls: type[ResidualDropout]) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, ResidualDropout):
            m.__class__ = cls
    return model


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    import copy
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    rows, records = [], []
    for arch in args.archs:
        for cl in C.layouts(args.channels_last):
            layout = 'channels_last' if cl else 'contiguous'
            base, dropres = T.build_pair(arch, device, cl, compile_=False)
            models = {'base': base}
            models.update({name: with_variant(copy.deepcopy(dropres), VARIANTS[name]) for name in args.variants})
            for bs in args.batch_sizes:
                x, y = C.make_batch(bs, args.img_size, T.NUM_CLASSES, device, cl)
                steps = {k: T.make_step(m, x, y, device, dtype)[0] for k, m in models.items()}
                t = C.interleaved(steps, device=device, reps=args.reps, warmup=args.warmup, iters=args.iters,
                                  clock=args.clock)
                del steps
                peaks = {}
                for k, m in models.items():
                    step, opt = T.make_step(m, x, y, device, dtype)
                    step()
                    peaks[k] = C.peak_step_memory(step, device, m, opt, x, y)
                    del step, opt
                    m.zero_grad(set_to_none=True)
                static = T.static_bytes(base)
                for name in args.variants:
                    speed = C.paired_ratio(t[name], t['base'])
                    mem = peaks[name] / peaks['base']
                    act = (peaks[name] - static) / max(peaks['base'] - static, 1)
                    rows.append([arch, layout, bs, name, C.fmt_stat(C.throughput(t[name], bs)),
                                 C.fmt_stat(speed, 3), C.ratio_verdict(speed, T.SPEED_TARGET),
                                 f'{mem:.3f}', C.verdict(mem, T.MEMORY_TARGET, higher_is_better=False), f'{act:.3f}'])
                    records.append(dict(arch=arch, layout=layout, batch=bs, variant=name, speed=speed, memory=mem,
                                        activation_memory=act))
                rows.append([arch, layout, bs, f'base (head drop {T.HEAD_RATE})',
                             C.fmt_stat(C.throughput(t['base'], bs)), '1', '', '1', '', '1'])
    title = (f'### Dropout kernel what-if (train step vs base, {args.dtype}, {args.img_size}px; median (min–max) '
             f'of {args.reps} interleaved reps, {args.clock} clock)')
    headers = ['arch', 'layout', 'batch', 'ResidualDropout kernel', 'img/s', f'speed ratio (>= {T.SPEED_TARGET})',
               'met', f'memory ratio (<= {T.MEMORY_TARGET})', 'met', 'batch-dependent part ratio']
    return '\n'.join([title, '', C.environment(device), '', C.markdown_table(headers, rows)]), records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0], archs=('resnet50',), batch_sizes=(16,), img_size=112, reps=4,
                      smoke_help='tiny run (test_resnet, 32 px) so tests keep the script alive', channels_last='no')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=tuple(VARIANTS),
                   help=f'kernels to compare with the base (default: all of {" ".join(VARIANTS)})')
    args = C.parse_args(p, argv, SMOKE)
    if args.compile:
        p.error('--compile is not supported here: compiled graphs replace the eager dropout kernel being compared')
    return args


def main(argv: list[str] | None = None) -> int:
    return C.print_table(run(parse_args(argv))[0])


if __name__ == '__main__':
    raise SystemExit(main())
