"""Before/after: the dropout kernel inside ``ResidualDropout`` on CPU, train-step speed and memory.

On CPU, ``F.dropout`` is not fused: it draws a float mask with ``bernoulli_`` (slow, ~4x the cost of
``rand_like``), divides it, multiplies, and keeps the float mask for backward. This script swaps the
kernel of every ``ResidualDropout`` in ``<arch>_dropres`` (by re-typing the modules, like ``convert``)
and measures each variant against the same base model, interleaved, in one run:

* ``current``: what the package runs by default (``set_dropout_kernel('auto')``): on CPU at p <= 0.125 the
  dropped positions drawn as geometric gaps and applied inside one compiled pass each way
  (``timm_dropres.models.cpu_kernel``), int32 positions kept for backward; above, a uint8 mask from 16-bit
  uniforms (``timm_dropres.models.layers._cpu_dropout``); in train mode the post-activation blocks fuse it
  with the residual addition and ReLU (``residual_dropout_add``). On CUDA the Triton kernels that keep no
  mask (``timm_dropres.models.triton_dropout``), fused with the addition and ReLU.
* ``ops``: ``set_dropout_kernel('ops')``: the same, with nothing compiled: the CPU passes made of ATen ops (a
  scaling pass and a scatter each way; the ReLU and its backward as passes of their own).
* ``unfused``: the same module with ``set_dropout_kernel('unfused')``: the op before issue 22 (the CPU kernel
  without the addition; ``torch.native_dropout`` on CUDA), the addition and ReLU as separate ops.
* ``positions`` / ``mask``: the package's position kernel / uint8 mask kernel at any rate, to place the
  threshold between them (``POSITION_KERNEL_MAX_P``).
* ``mask16_bool``: the kernel it replaced (issue 14): 16-bit uniforms sliced from 64-bit draws and a bool
  mask, multiplied in (a slow mixed-dtype path on CPU) and kept for backward.
* ``f_dropout``: ``F.dropout``, what ``ResidualDropout`` called before that.
* ``rand_ge``: ``noise = rand_like(x).ge_(p).div_(1 - p); x * noise`` -- one uniform draw per element,
  same float mask memory, same distribution.
* ``native``: ``torch.native_dropout`` -- what ``F.dropout`` already calls on CUDA; on CPU it keeps a
  bool mask (1 byte per element instead of 4) but is slower.
* ``rand_bool``: one uniform draw, a bool mask saved for backward, float multiplies (a custom
  ``autograd.Function``: fast and small, but not scriptable).

Every variant other than ``current`` runs with ``set_dropout_kernel('unfused')``, so its module's
``forward`` is what runs at every position. Target ratios as figures 2 and 3 (>= 0.98 speed, <= 1.02 memory).

``--isolated`` times each kernel alone instead (forward + backward on the tensors the model's dropouts
see in one step) against the base model's whole train step, which resolves shares of 1-2 % that whole-step
ratios cannot on a shared machine. ``--tails`` does so for the fused block tails (dropout, addition, ReLU)
minus the base's own addition and ReLU. ``--drops`` times only the drawing of one step's drops
(``drop_positions`` on every dropout's tensor), ``current`` (the compiled pass) against ``ops`` (ATen ops).

    python benchmarks/dropout_impl.py --archs resnet50 --batch-sizes 16
    python benchmarks/dropout_impl.py --isolated --variants current mask16_bool --reps 15
    python benchmarks/dropout_impl.py --drops --variants current ops --reps 15
"""
from __future__ import annotations

import argparse
import functools

import torch

try:
    from benchmarks import common as C
    from benchmarks import training as T
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]
    import training as T  # type: ignore[no-redef]

from timm_dropres import ResidualDropout
from timm_dropres.models import layers

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


class _ForcedKernel(ResidualDropout):
    """The package's CPU kernel with the position/mask threshold moved to ``threshold``."""

    threshold: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return layers._cpu_dropout(x, self.p, position_max_p=self.threshold)


class PositionsDropout(_ForcedKernel):
    """The package's position kernel at any rate."""

    threshold = 1.0


class MaskDropout(_ForcedKernel):
    """The package's uint8 mask kernel at any rate."""

    threshold = 0.0


VARIANTS: dict[str, type[ResidualDropout]] = {
    'current': ResidualDropout, 'ops': ResidualDropout, 'unfused': ResidualDropout, 'positions': PositionsDropout,
    'mask': MaskDropout,
    'mask16_bool': Mask16BoolDropout, 'f_dropout': FDropout,
    'rand_ge': RandGeDropout, 'native': NativeDropout, 'rand_bool': RandBoolDropout}


#: The variants ``--tails`` can time (those that differ in what ``residual_dropout_add`` runs).
TAIL_VARIANTS = ('current', 'ops', 'unfused')
#: What ``--drops`` compares: the compiled pass and the ATen op chain (the other variants draw no positions).
DROP_VARIANTS = ('current', 'ops')


def kernel_of(variant: str) -> str:
    """The ``set_dropout_kernel`` choice a variant runs under: the default for ``current``, ``ops`` for ``ops``,
    else ``unfused`` (the blocks then call each module's own ``forward`` instead of the fused dropout + addition)."""
    return {'current': 'auto', 'ops': 'ops'}.get(variant, 'unfused')


def kernel_note(device: torch.device) -> str:
    """What ``current`` ran on CPU: the compiled kernel, or (where it cannot be built) its ATen-op version."""
    if device.type != 'cpu':
        return ''
    from timm_dropres.models import cpu_kernel

    error = cpu_kernel.build_error()
    if error is None:
        return 'compiled CPU kernel: built, so `current` runs it'
    return f'compiled CPU kernel: not built here, so `current` runs the ATen ops ({error.splitlines()[0][:200]})'


def report(title: str, device: torch.device, headers: list[str], rows: list[list]) -> str:
    """A mode's markdown: title, the machine, what ``current`` ran, the table."""
    lines = [title, '', C.environment(device)] + [n for n in [kernel_note(device)] if n]
    return '\n'.join(lines + ['', C.markdown_table(headers, rows)])


def under_kernel(kernel: str, fn):
    """``fn`` run with ``set_dropout_kernel(kernel)`` (restored after each call)."""
    def run() -> object:
        with layers.dropout_kernel(kernel):
            return fn()
    return run


def with_variant(model: torch.nn.Module, cls: type[ResidualDropout]) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, ResidualDropout):
            m.__class__ = cls
    return model


def dropout_inputs(model: torch.nn.Module, x: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> list[tuple[float, torch.Tensor]]:
    """``(p, input)`` for every active ``ResidualDropout`` of ``model`` in one forward of ``x`` (inputs copied).

    The forward runs under the same autocast as the train step (``dtype``), so the inputs have the dtype
    the dropouts see there.
    """
    seen: list[tuple[float, torch.Tensor]] = []

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.p > 0:
            seen.append((module.p, inputs[0].detach().clone()))  # clone keeps the memory format

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, ResidualDropout)]
    try:
        with torch.no_grad(), C.autocast(x.device, dtype):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def settings(args: argparse.Namespace, device: torch.device):
    """Every setting of a run, each model pair built once per architecture and layout.

    Yields:
        ``(arch, layout, base, dropres, batch_size, x, y)``.
    """
    for arch in args.archs:
        for cl in C.layouts(args.channels_last):
            base, dropres = T.build_pair(arch, device, cl, compile_=False, res_drop_rate=args.res_drop_rate)
            for bs in args.batch_sizes:
                x, y = C.make_batch(bs, args.img_size, T.NUM_CLASSES, device, cl)
                yield arch, 'channels_last' if cl else 'contiguous', base, dropres, bs, x, y


def chosen_variants(args: argparse.Namespace, allowed: tuple[str, ...], mode: str) -> list[str]:
    """The ``--variants`` a mode can compare, or exit naming the ones it can."""
    variants = [v for v in args.variants if v in allowed]
    if not variants:
        raise SystemExit(f'{mode} compares the variants {", ".join(allowed)}; pass at least one of them')
    return variants


def isolated(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Each kernel alone, forward + backward on the very tensors the model's dropouts see in one step,
    timed interleaved with the base model's whole train step: the kernel's share of a step.

    A kernel timed alone is far steadier on a shared machine than the difference of two whole steps
    (it misses only second-order effects such as the cache it evicts), so it resolves the 1-2 % that
    the step ratios' ranges cannot.
    """
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    rows, records = [], []
    for arch, layout, base, dropres, bs, x, y in settings(args, device):
        inputs = [(p, t.requires_grad_()) for p, t in dropout_inputs(dropres, x, dtype)]
        upstream = [torch.randn_like(t) for _, t in inputs]
        cases = {'base step': T.make_step(base, x, y, device, dtype)[0]}
        for name in args.variants:
            modules = [VARIANTS[name](p).train() for p, _ in inputs]

            def kernels(modules=modules, inputs=inputs, upstream=upstream) -> None:
                for m, (_, t), g in zip(modules, inputs, upstream, strict=True):
                    torch.autograd.grad(m(t), t, g)

            cases[name] = under_kernel(kernel_of(name), kernels)
        t = C.interleaved(cases, device=device, reps=args.reps, warmup=args.warmup, iters=args.iters,
                          clock=args.clock)
        step, step_min = C.Stat.of(t['base step']).median, min(t['base step'])
        elements = sum(t_.numel() for _, t_ in inputs)
        for name in args.variants:
            cost = C.Stat.of(t[name])
            share = cost.median / step
            rows.append([arch, layout, bs, name, len(inputs), f'{elements / 1e6:.1f}',
                         f'{cost.median * 1e3:.1f} ({cost.lo * 1e3:.1f}–{cost.hi * 1e3:.1f})',
                         f'{step * 1e3:.0f}', f'{100 * share:.2f}', f'{100 * cost.lo / step_min:.2f}',
                         f'{1 / (1 + share):.3f}'])
            records.append(dict(arch=arch, layout=layout, batch=bs, variant=name, kernel_s=cost,
                                step_s=step, share=share))
    title = (f'### Dropout kernels alone: forward + backward on the inputs of one step, vs the base train step '
             f'({args.dtype}, {args.img_size}px, res_drop_rate {args.res_drop_rate}; {args.reps} interleaved reps, '
             f'{args.clock} clock)')
    headers = ['arch', 'layout', 'batch', 'kernel', 'dropouts', 'M elements', 'kernel ms / step, median (min–max)',
               'base step ms (median)', 'share % (medians)', 'share % (minima)', 'implied speed ratio']
    return report(title, device, headers, rows), records


def tail_inputs(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[list[tuple[float, torch.Tensor, torch.Tensor, bool]], list[tuple[float, torch.Tensor]]]:
    """What one train-mode forward (autograd on) hands to the fused tails and to the other dropouts.

    Returns:
        ``(tails, singles)``: ``(p, branch, shortcut, relu)`` for every block that called
        ``residual_dropout_add`` (post-activation at ``after_last_bn``) and ``(p, input)`` for every
        ``ResidualDropout`` called as a module (the head, pre-activation blocks); tensors copied.
    """
    from timm_dropres.models import blocks

    tails: list[tuple[float, torch.Tensor, torch.Tensor, bool]] = []
    real = blocks.residual_dropout_add

    def spy(branch, shortcut, p, training=True, relu=False, inplace=False):
        tails.append((p, branch.detach().clone(), shortcut.detach().clone(), relu))
        return real(branch, shortcut, p, training, relu, inplace)

    singles: list[tuple[float, torch.Tensor]] = []

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.p > 0:
            singles.append((module.p, inputs[0].detach().clone()))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, ResidualDropout)]
    blocks.residual_dropout_add = spy
    try:
        with layers.dropout_kernel('auto'), C.autocast(x.device, dtype):
            model(x)
    finally:
        blocks.residual_dropout_add = real
        for h in hooks:
            h.remove()
    return tails, singles


def tails(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """``--tails``: the dropout's marginal cost with the residual addition, timed alone.

    For every post-activation block the tail (dropout, addition, ReLU) runs forward + backward on the
    block's own tensors, as ``current`` (fused, ``residual_dropout_add``) and ``unfused`` (the separate
    ops), and so does the base model's tail (addition + ReLU). The other dropouts (head, pre-activation
    blocks) run alone as in ``--isolated``. A variant's share of the base step is (its time - the base
    tails' time) / the base step, all interleaved: what the dropout adds to what the base runs anyway. Each
    case has its own copy of the tensors, and a base train step runs between any two of them in both orders
    of the interleaving, so each starts from the caches a train step leaves: run back to back, the second
    found its data warm (a bias of about 3 ms per resnetv2_50 step, in favour of whichever ran second).
    """
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    variants = chosen_variants(args, TAIL_VARIANTS, '--tails')
    rows, records = [], []
    for arch, layout, base, dropres, bs, x, y in settings(args, device):
        fused, singles = tail_inputs(dropres, x, dtype)

        def own_copy(fused=fused, singles=singles):
            """Each case its own tensors: sharing them, a case would find the previous case's data warm in
            the cache (the variant run first paid for everyone's cache misses)."""
            f = [(p, a.clone().requires_grad_(), b.clone().requires_grad_(), r) for p, a, b, r in fused]
            s_ = [(p, t.clone().requires_grad_()) for p, t in singles]
            return f, s_, [torch.randn_like(a) for _, a, _, _ in f], [torch.randn_like(t) for _, t in s_]

        # both start from a copy of the branch, which they then overwrite as the blocks do (x += shortcut)
        def base_tails(data) -> None:
            fused, _, up_f, _ = data
            for (_, a, b, relu), g in zip(fused, up_f, strict=True):
                out = a.clone()
                out += b
                torch.autograd.grad(torch.relu_(out) if relu else out, (a, b), g)

        def dropres_tails(data) -> None:
            fused, singles, up_f, up_s = data
            for (p, a, b, relu), g in zip(fused, up_f, strict=True):
                out = layers.residual_dropout_add(a.clone(), b, p, True, relu, inplace=True)
                torch.autograd.grad(out, (a, b), g)
            for (p, t), g in zip(singles, up_s, strict=True):
                torch.autograd.grad(layers.residual_dropout(t, p, True), t, g)

        # a base train step between any two timed tail cases, in both orders of the interleaving: each case
        # then starts from the caches a train step leaves (back to back, the second found its data warm,
        # and in the A B, B A order the last case ran twice in a row)
        train_step = T.make_step(base, x, y, device, dtype)[0]
        cases = {'base step': train_step, 'base tails': functools.partial(base_tails, own_copy())}
        for v in variants:
            cases[f'(a step before {v})'] = train_step
            cases[v] = under_kernel(kernel_of(v), functools.partial(dropres_tails, own_copy()))
        cases['(a step after the last)'] = train_step
        t = C.interleaved(cases, device=device, reps=args.reps, warmup=args.warmup, iters=args.iters,
                          clock=args.clock)
        step = C.Stat.of(t['base step']).median
        for name in variants:
            extra = [a - b for a, b in zip(t[name], t['base tails'], strict=True)]  # adjacent reps
            cost = C.Stat.of(extra)
            share = cost.median / step
            ms = {k: f'{C.Stat.of(t[k]).median * 1e3:.1f}' for k in (name, 'base tails')}
            rows.append([arch, layout, bs, name, len(fused), len(singles), ms[name], ms['base tails'],
                         f'{cost.median * 1e3:.1f} ({cost.lo * 1e3:.1f}–{cost.hi * 1e3:.1f})',
                         f'{step * 1e3:.0f}', f'{100 * share:.2f}', f'{1 / (1 + share):.3f}'])
            records.append(dict(arch=arch, layout=layout, batch=bs, variant=name, extra_s=cost, step_s=step,
                                share=share, fused_sites=len(fused), other_sites=len(singles)))
    title = (f'### Dropout with the residual addition, timed alone: forward + backward of the block tails on the '
             f'tensors of one step, minus the base tails, vs the base train step ({args.dtype}, {args.img_size}px, '
             f'res_drop_rate {args.res_drop_rate}; {args.reps} interleaved reps, {args.clock} clock)')
    headers = ['arch', 'layout', 'batch', 'kernel', 'fused tails', 'other dropouts', 'dropres tails ms',
               'base tails ms', 'extra ms / step, median (min–max)', 'base step ms (median)', 'share % (medians)',
               'implied speed ratio']
    return report(title, device, headers, rows), records


def drops(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """``--drops``: drawing the drops of one train step alone, against the base train step.

    ``drop_positions`` for the tensor of every dropout one forward calls (the fused tails and the others) at
    rates the position kernel serves, under ``current`` (the compiled pass turns the random words into
    positions where it builds) and ``ops`` (the ATen op chain): both draw the same positions, so the
    difference is the cost of the passes alone.
    """
    from timm_dropres.models import cpu_dropout

    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    if device.type != 'cpu':
        raise SystemExit(f'--drops times the CPU drop draws; got --device {args.device}')
    variants = chosen_variants(args, DROP_VARIANTS, '--drops')
    rows, records = [], []
    for arch, layout, base, dropres, bs, x, y in settings(args, device):
        fused, singles = tail_inputs(dropres, x, dtype)
        sizes = [(p, a.numel()) for p, a, _, _ in fused] + [(p, t.numel()) for p, t in singles]
        sizes = [(p, n) for p, n in sizes if p <= cpu_dropout.POSITION_KERNEL_MAX_P]

        def draw(sizes=sizes) -> None:
            for p, n in sizes:
                cpu_dropout.drop_positions(n, p)

        cases = {'base step': T.make_step(base, x, y, device, dtype)[0]}
        cases.update({v: under_kernel(kernel_of(v), draw) for v in variants})
        t = C.interleaved(cases, device=device, reps=args.reps, warmup=args.warmup, iters=args.iters,
                          clock=args.clock)
        step = C.Stat.of(t['base step']).median
        expected = sum(p * n for p, n in sizes)
        for name in variants:
            cost = C.Stat.of(t[name])
            share = cost.median / step
            rows.append([arch, layout, bs, name, len(sizes), f'{expected / 1e6:.2f}',
                         f'{cost.median * 1e3:.2f} ({cost.lo * 1e3:.2f}–{cost.hi * 1e3:.2f})',
                         f'{step * 1e3:.0f}', f'{100 * share:.2f}'])
            records.append(dict(arch=arch, layout=layout, batch=bs, variant=name, draw_s=cost, step_s=step,
                                share=share, sites=len(sizes)))
    title = (f'### Drawing the drops of one step alone (drop_positions on every dropout\'s tensor) vs the base train '
             f'step ({args.img_size}px, res_drop_rate {args.res_drop_rate}; {args.reps} interleaved reps, '
             f'{args.clock} clock)')
    headers = ['arch', 'layout', 'batch', 'kernel', 'dropouts', 'expected drops (M)', 'ms / step, median (min–max)',
               'base step ms (median)', 'share % (medians)']
    return report(title, device, headers, rows), records


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    import copy
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    rows, records = [], []
    for arch in args.archs:
        for cl in C.layouts(args.channels_last):
            layout = 'channels_last' if cl else 'contiguous'
            base, dropres = T.build_pair(arch, device, cl, compile_=False, res_drop_rate=args.res_drop_rate)
            models = {'base': base}
            models.update({name: with_variant(copy.deepcopy(dropres), VARIANTS[name]) for name in args.variants})
            for bs in args.batch_sizes:
                x, y = C.make_batch(bs, args.img_size, T.NUM_CLASSES, device, cl)
                steps = {k: under_kernel(kernel_of(k), T.make_step(m, x, y, device, dtype)[0])
                         for k, m in models.items()}
                t = C.interleaved(steps, device=device, reps=args.reps, warmup=args.warmup, iters=args.iters,
                                  clock=args.clock)
                del steps
                peaks = {}
                for k, m in models.items():
                    step, opt = T.make_step(m, x, y, device, dtype)
                    step = under_kernel(kernel_of(k), step)
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
                                 C.fmt_ratio(speed), C.ratio_verdict(speed, T.SPEED_TARGET),
                                 f'{mem:.3f}', C.verdict(mem, T.MEMORY_TARGET, higher_is_better=False), f'{act:.3f}'])
                    records.append(dict(arch=arch, layout=layout, batch=bs, variant=name, speed=speed, memory=mem,
                                        activation_memory=act, seconds={k: t[k] for k in ('base', name)}))
                rows.append([arch, layout, bs, f'base (head drop {T.HEAD_RATE})',
                             C.fmt_stat(C.throughput(t['base'], bs)), '1', '', '1', '', '1'])
    title = (f'### Dropout kernel what-if (train step vs base, {args.dtype}, {args.img_size}px; img/s: median '
             f'(min–max) of {args.reps} interleaved reps; {C.ci_note(args.reps)}; {args.clock} clock, '
             f'res_drop_rate {args.res_drop_rate})')
    headers = ['arch', 'layout', 'batch', 'ResidualDropout kernel', 'img/s', f'speed ratio (>= {T.SPEED_TARGET})',
               'met', f'memory ratio (<= {T.MEMORY_TARGET})', 'met', 'batch-dependent part ratio']
    return report(title, device, headers, rows), records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0], archs=('resnet50',), batch_sizes=(16,), img_size=112, reps=4,
                      smoke_help='tiny run (test_resnet, 32 px) so tests keep the script alive', channels_last='no')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=tuple(VARIANTS),
                   help=f'kernels to compare with the base (default: all of {" ".join(VARIANTS)})')
    p.add_argument('--isolated', action='store_true',
                   help='time each kernel alone on the inputs of one step, against the base step (see isolated())')
    p.add_argument('--tails', action='store_true',
                   help='time the block tails (dropout + addition + ReLU) alone, current vs unfused, minus the '
                        "base's tails (see tails())")
    p.add_argument('--drops', action='store_true',
                   help='time drawing the drops of one step alone, current vs ops, against the base step (see drops())')
    T.add_res_drop_rate(p)
    args = C.parse_args(p, argv, SMOKE)
    modes = [f'--{m}' for m in ('isolated', 'tails', 'drops') if getattr(args, m)]
    if len(modes) > 1:
        p.error(f'{" and ".join(modes)} are different measures; pass one')
    if args.compile:
        p.error('--compile is not supported here: compiled graphs replace the eager dropout kernel being compared')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fn = tails if args.tails else isolated if args.isolated else drops if args.drops else run
    return C.emit(args, *fn(args), script='dropout_impl')


if __name__ == '__main__':
    raise SystemExit(main())
