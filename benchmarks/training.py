"""Figures 2 and 3: training overhead and training memory of ``<arch>_dropres`` vs ``<arch>``.

The baseline is what a timm user would otherwise train: ``<arch>`` with timm's own head dropout at
``HEAD_RATE`` (0.1). The dropres model has its head dropout before pooling at the same rate and adds one
dropout per residual block at ``--res-drop-rate`` (default 0.1). Both rates are explicit: the package
defaults are 0.0, which would time no dropout at all. Both start from the same weights and take
full training steps (forward, backward, AdamW step from timm's ``create_optimizer_v2``).

* Figure 2: train-step img/s ratio, dropres / base. Target >= 0.98 (issue 14; 0.95 before).
* Figure 3: peak tensor memory of one train step (after a warm step, so optimizer state exists),
  dropres / base. Target <= 1.02 (issue 14; 1.10 before).

    python benchmarks/training.py
    python benchmarks/training.py --device cuda --dtype bfloat16 --img-size 224 --batch-sizes 128
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

try:
    from benchmarks import common as C
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]

import timm_dropres

HEAD_RATE = 0.1  # head dropout of both models (timm's after pooling, dropres's before): the rate of past figures

SPEED_TARGET = 0.98
MEMORY_TARGET = 1.02
ARCHS = ('resnet18', 'resnet50', 'resnetv2_50', 'resnext50_32x4d')
SMOKE = ['--threads', '1', '--channels-last', 'no', '--archs', 'test_resnet', '--batch-sizes', '2',
         '--img-size', '32', '--reps', '2', '--warmup', '1', '--iters', '1', '--memory-batch-size', '2']
NUM_CLASSES = 1000
RES_DROP_RATE = 0.1  # a rate users pick from the guideline's range; served by the position kernel on CPU


def build_pair(arch: str, device: torch.device, channels_last: bool, compile_: bool,
               res_drop_rate: float = RES_DROP_RATE) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``<arch>`` with timm's head dropout and ``<arch>_dropres`` with ``res_drop_rate``, same weights.

    Args:
        arch: Base timm architecture name.
        device: Where both models live.
        channels_last: Convert both models to ``torch.channels_last``.
        compile_: Wrap both models in ``torch.compile``.
        res_drop_rate: Residual dropout rate of the dropres model.

    Returns:
        ``(base, dropres)`` in train mode.
    """
    base = timm.create_model(arch, drop_rate=HEAD_RATE, num_classes=NUM_CLASSES)
    dropres = timm.create_model(arch + timm_dropres.SUFFIX, num_classes=NUM_CLASSES, drop_rate=HEAD_RATE,
                                res_drop_rate=res_drop_rate)
    dropres.load_state_dict(base.state_dict(), strict=True)
    base = C.prepare(base.train(), device, channels_last)
    dropres = C.prepare(dropres.train(), device, channels_last)
    if compile_:
        base, dropres = torch.compile(base), torch.compile(dropres)
    return base, dropres


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
              dtype: torch.dtype) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One full training step: forward (autocast when dtype is not float32), loss, backward, AdamW step."""
    opt = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with C.autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step, opt


def static_bytes(model: torch.nn.Module) -> int:
    """Bytes that do not scale with the batch: parameters, their grads and AdamW's two moments, buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 4 * params + sum(b.numel() * b.element_size() for b in model.buffers())


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    speed_rows, mem_rows, records = [], [], []
    mem_bs = args.memory_batch_size or max(args.batch_sizes)
    for arch in args.archs:
        for li, cl in enumerate(C.layouts(args.channels_last)):
            layout = 'channels_last' if cl else 'contiguous'
            base, dropres = build_pair(arch, device, cl, args.compile, args.res_drop_rate)
            for bs in args.batch_sizes:
                x, y = C.make_batch(bs, args.img_size, NUM_CLASSES, device, cl)
                (sb, _), (sd, _) = make_step(base, x, y, device, dtype), make_step(dropres, x, y, device, dtype)
                t = C.interleaved({'base': sb, 'dropres': sd}, device=device, reps=args.reps,
                                  warmup=args.warmup, iters=args.iters,
                                  clock=args.clock)
                tb, td = C.throughput(t['base'], bs), C.throughput(t['dropres'], bs)
                ratio = C.paired_ratio(t['dropres'], t['base'])
                speed_rows.append([arch, layout, bs, C.fmt_stat(tb), C.fmt_stat(td), C.fmt_ratio(ratio),
                                   C.ratio_verdict(ratio, SPEED_TARGET)])
                records.append(dict(figure=2, arch=arch, layout=layout, batch=bs, base=tb, dropres=td, ratio=ratio,
                                    seconds=dict(t)))  # every repetition, in order: the pairs behind the ratio
            # Tensor byte counts do not depend on layout on CPU, and the tracker is slow there: one layout.
            if args.memory == 'yes' and (device.type == 'cuda' or li == 0):
                del sb, sd  # the timing steps' optimizer state must not count on CUDA
                x, y = C.make_batch(mem_bs, args.img_size, NUM_CLASSES, device, cl)
                peaks = []
                for model in (base, dropres):
                    step, opt = make_step(model, x, y, device, dtype)
                    step()  # warm step: optimizer state and grads exist, as in steady-state training
                    peaks.append(C.peak_step_memory(step, device, model, opt, x, y))
                    del step, opt
                    model.zero_grad(set_to_none=True)
                ratio = peaks[1] / peaks[0]
                # what grows with the batch: the peak less weights, grads and AdamW's two moments
                static = static_bytes(base)
                act_ratio = (peaks[1] - static) / max(peaks[0] - static, 1)
                mib = 2 ** 20
                mem_rows.append([arch, layout, mem_bs, f'{peaks[0] / mib:.1f}', f'{peaks[1] / mib:.1f}',
                                 f'{(peaks[1] - peaks[0]) / mib:.1f}', f'{ratio:.3f}',
                                 C.verdict(ratio, MEMORY_TARGET, higher_is_better=False), f'{act_ratio:.3f}'])
                records.append(dict(figure=3, arch=arch, layout=layout, batch=mem_bs, base=peaks[0],
                                    dropres=peaks[1], ratio=ratio, activation_ratio=act_ratio))
            del base, dropres
    env = C.environment(device)
    what = (f'{args.dtype}{" autocast" if args.dtype != "float32" else ""}, {args.img_size}px, '
            f'res_drop_rate {args.res_drop_rate}') + (
        ', torch.compile' if args.compile else '')
    out = [f'### Figure 2: training overhead (train-step img/s, {what}; img/s: median (min–max) of '
           f'{args.reps} interleaved reps; {C.ci_note(args.reps)}; {args.clock} clock)', '', env, '',
           C.markdown_table(['arch', 'layout', 'batch', f'base img/s (head drop {HEAD_RATE})', 'dropres img/s',
                             f'ratio (target >= {SPEED_TARGET})', 'met'], speed_rows)]
    if mem_rows:
        how = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'torch MemTracker, tensor bytes'
        out += ['', f'### Figure 3: training memory (peak of one train step incl. params, grads and AdamW '
                f'state; {what}; {how})', '',
                C.markdown_table(['arch', 'layout', 'batch', 'base MiB', 'dropres MiB', 'extra MiB',
                                  f'ratio (target <= {MEMORY_TARGET})', 'met', 'batch-dependent part ratio'],
                                 mem_rows)]
    return '\n'.join(out), records


def _timed_rate(text: str) -> float:
    """A rate that times something: in (0, 1); 0 would time no residual dropout at all."""
    rate = float(text)
    if not 0.0 < rate < 1.0:
        raise argparse.ArgumentTypeError(f'must be in (0, 1), got {text}')
    return rate


def add_res_drop_rate(p: argparse.ArgumentParser) -> None:
    """The dropres model's residual dropout rate, shared with ceiling.py, dropout_impl.py and trainer.py."""
    p.add_argument('--res-drop-rate', type=_timed_rate, default=RES_DROP_RATE,
                   help=f'residual dropout rate of the dropres model, in (0, 1) (default: {RES_DROP_RATE})')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0], archs=ARCHS, batch_sizes=(8,), img_size=112, reps=5,
                      smoke_help='tiny run (test_resnet, 32 px, 2 reps) so tests keep the script alive')
    add_res_drop_rate(p)
    p.add_argument('--memory', default='yes', choices=('yes', 'no'), help='measure figure 3 (default: yes)')
    p.add_argument('--memory-batch-size', type=int, default=0,
                   help='batch size for figure 3 (default: the largest of --batch-sizes)')
    args = C.parse_args(p, argv, SMOKE)
    if args.memory_batch_size < 0:
        p.error(f'--memory-batch-size must be >= 0, got {args.memory_batch_size}')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return C.emit(args, *run(args), script='training')


if __name__ == '__main__':
    raise SystemExit(main())
