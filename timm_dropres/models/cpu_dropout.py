"""Residual dropout on CPU: the drops drawn as positions (or a mask) and applied in one pass each way.

At rates up to ``POSITION_KERNEL_MAX_P`` the positions of the drops are drawn as geometric gaps
(``drop_positions``), so the random numbers cost ``p * n`` draws, and only the positions are saved for backward;
the compiled kernel also turns the random words into positions, as the ATen ops would. The passes that apply them
run in the compiled kernel (``cpu_kernel``) when ``kernel_choice.use_cpp()`` says so, else as ATen ops (a scaling
pass and a scatter each way). Above that rate a uint8 keep mask is drawn and applied with ATen ops.
``_cpu_dropout_add`` fuses the residual addition (and the block's ReLU) into the same pass.

Example:
    >>> import torch
    >>> from timm_dropres.models import cpu_dropout
    >>> _ = torch.manual_seed(0)
    >>> pos = cpu_dropout.drop_positions(1000, 0.1)
    >>> pos.dtype, bool((pos.diff() > 0).all()), 60 < pos.numel() < 140
    (torch.int32, True, True)
"""

import math
from typing import Final, Optional

import torch

from . import cpu_kernel
from .kernel_choice import use_cpp

__all__ = ['POSITION_KERNEL_MAX_P', 'geometric_gaps', 'uniforms', 'drop_positions']

#: Rates up to this use the position kernel (saved positions cost 4p bytes per element as int32, 8p
#: as int64 for tensors over 2**31 elements); above it the uint8 mask kernel (1 byte) is faster: the two
#: tie at 0.15 on ResNet-50 (docs/benchmarks.md, "Re-measured at explicit rates").
POSITION_KERNEL_MAX_P: Final[float] = 0.125
_LEVELS = 1 << 16  # resolution of the mask kernel's uniforms
_INT32_MAX = (1 << 31) - 1
#: The largest gap the compiled pass takes (``cpu_kernel.geometric_positions_`` checks it); rates so low that a
#: gap could pass it (below about 1.6e-8) take the ATen op chain.
_COMPILED_MAX_GAP = 1 << 30


def _check_open_rate(p: float) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f'p must be in (0, 1) for drawing drops, got {p!r}')


def _memory_order(x: torch.Tensor) -> tuple[int, ...]:
    """Dimensions from the outermost to the innermost stride (the order the elements sit in memory)."""
    strides = x.stride()
    return tuple(sorted(range(x.dim()), key=lambda d: -strides[d]))


def _empty_in_order(like: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """A dense tensor shaped like ``like`` whose elements sit in memory in dimension order ``order``."""
    strides = [0] * like.dim()
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= like.shape[d]
    return torch.empty_strided(like.shape, strides, dtype=like.dtype, device=like.device)


def geometric_gaps(uniform: torch.Tensor, p: float) -> torch.Tensor:
    """Turn uniforms in [0, 1) into Geometric(``p``) gaps (values 1, 2, ...) by the inverse CDF, in place.

    ``P(gap > j) = P(1 - u <= (1 - p) ** j) = (1 - p) ** j``, so the gaps between the drops of an i.i.d.
    Bernoulli(``p``) sequence. Exposed so tests can push every float32 uniform through the exact code
    the kernel runs and compute the realised rate without sampling.

    Args:
        uniform: float tensor of uniforms in [0, 1); overwritten.
        p: drop probability in (0, 1).

    Returns:
        ``uniform``, now holding the gaps as whole numbers.

    Raises:
        ValueError: ``p`` is not in (0, 1).
    """
    _check_open_rate(p)
    return uniform.neg_().add_(1.0).log_().mul_(1.0 / math.log1p(-p)).floor_().add_(1.0)


def _random_words(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` random ``dtype`` words (int16 or int32), sliced from 64-bit draws of torch's CPU generator."""
    per_draw = 64 // torch.iinfo(dtype).bits
    draws = torch.empty((n + per_draw - 1) // per_draw, dtype=torch.int64).random_(-(1 << 63), None)
    return draws.view(dtype)[:n]


def uniforms(m: int) -> torch.Tensor:
    """``m`` float32 uniforms on the grid ``k * 2**-24``, ``k`` in ``[0, 2**24)``: the values ``torch.rand`` gives.

    Sliced from 64-bit draws of torch's CPU generator (two 24-bit uniforms per draw; ``torch.rand`` spends a
    32-bit draw on each and costs about 1.4x as much), so ``torch.manual_seed`` makes them repeatable.

    Args:
        m: how many.

    Returns:
        1-D float32 tensor on the CPU.
    """
    return _uniforms_of(_random_words(m, torch.int32))


def _uniforms_of(words: torch.Tensor) -> torch.Tensor:
    """``uniforms`` from given int32 words: their low 24 bits times ``2**-24``, as float32."""
    return torch.bitwise_and(words, (1 << 24) - 1).to(torch.float32).mul_(2.0 ** -24)


def drop_positions(n: int, p: float, draws: int | None = None) -> torch.Tensor:
    """Sorted positions in ``[0, n)`` of the drops of ``n`` i.i.d. Bernoulli(``p``) trials.

    Draws about ``n * p`` geometric gaps (``geometric_gaps`` of ``uniforms``) instead of ``n`` uniforms, so the
    cost scales with the number of drops. The gaps cover ``n`` with overwhelming probability at the first
    draw (6 standard deviations of margin); otherwise more are drawn. Where the compiled kernel is in use
    (``kernel_choice.use_cpp()``) it turns the same random words into the same positions in three passes, one of
    them the same ``torch.log_`` (``cpu_kernel.geometric_positions_``), instead of the eleven passes of the ATen ops:
    the drops for a seed do not depend on the kernel.

    Args:
        n: number of trials (elements).
        p: drop probability in (0, 1).
        draws: gaps drawn at a time (default: the expected number of drops plus 6 standard deviations,
            which covers ``n`` at the first draw with overwhelming probability).

    Returns:
        1-D tensor of strictly increasing positions, on the CPU: int32 when every sum of gaps the draw can
        reach fits (half the bytes of int64, and what the kernels save), else int64.

    Raises:
        ValueError: ``n`` is negative, ``p`` is not in (0, 1) or ``draws`` is below 1.
    """
    _check_open_rate(p)
    if n < 0:
        raise ValueError(f'n must be >= 0, got {n!r}')
    if draws is not None and draws < 1:
        raise ValueError(f'draws must be >= 1 (or None for the default), got {draws!r}')
    if draws is None:
        mean = n * p
        draws = int(mean + 6.0 * math.sqrt(mean) + 16.0)
    # the largest gap a 24-bit uniform gives (u = 1 - 2**-24), so the largest position any draw can reach
    max_gap = math.floor(math.log(2.0 ** -24) / math.log1p(-p)) + 2
    reach = n + draws * max_gap  # the draw-on loop starts below n and adds one batch of gaps
    dtype = torch.int32 if reach <= _INT32_MAX else torch.int64
    if dtype == torch.int32 and max_gap <= _COMPILED_MAX_GAP and use_cpp():
        inv_log = 1.0 / math.log1p(-p)

        def batch(words: torch.Tensor, base: int) -> tuple[torch.Tensor, int]:
            return words, cpu_kernel.geometric_positions_(words, inv_log, n, base)
    else:
        def batch(words: torch.Tensor, base: int) -> tuple[torch.Tensor, int]:
            positions = geometric_gaps(_uniforms_of(words), p).cumsum(0, dtype=dtype).add_(base)
            return positions, int(torch.searchsorted(positions, n))
    # each batch of words: the positions after ``base`` and how many of them lie below n
    parts, base = [], -1
    while True:
        positions, count = batch(_random_words(draws, torch.int32), base)
        parts.append(positions[:count])
        if count < draws:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        base = int(positions[-1])  # every drop drawn so far lies inside [0, n): draw on


def _keep_mask(x: torch.Tensor, order: tuple[int, ...], drop_levels: int) -> torch.Tensor:
    """uint8 keep mask (1 = keep) in ``x``'s memory order, from 16-bit uniforms sliced from 64-bit draws."""
    uniform = _random_words(x.numel(), torch.int16).view([x.shape[d] for d in order])
    keep = torch.empty(uniform.shape, dtype=torch.uint8)
    return torch.ge(uniform, drop_levels - _LEVELS // 2, out=keep)


def _positions(drop: torch.Tensor) -> bool:
    """``drop`` holds drop positions (int32 or int64), not a uint8 keep mask."""
    return drop.dtype in (torch.int32, torch.int64)


def _in_order(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``t`` itself when it is dense in ``order``, else a copy that is (a gradient may come in another layout)."""
    if t.permute(order).is_contiguous():
        return t
    return _empty_in_order(t, order).copy_(t)


def _apply_drop(x: torch.Tensor, drop: torch.Tensor, scale: float, order: tuple[int, ...],
                compiled: bool) -> torch.Tensor:
    """``x * keep * scale`` as a new tensor laid out in ``order``; see ``_ApplyDrop`` for ``drop``. ``compiled``:
    positions go through the compiled kernel (decided once per call, so a backward runs what its forward ran)."""
    out = _empty_in_order(x, order)
    if compiled:
        return cpu_kernel.drop_scale(_in_order(x, order), drop, scale, out)
    if _positions(drop):
        torch.mul(x, scale, out=out)
        # scatter_ from a zero tensor: about half the time of index_fill_ per position on CPU
        out.permute(order).view(-1).scatter_(0, drop.long(), out.new_zeros(drop.numel()))
    else:
        out.permute(order).copy_(drop)
        out.mul_(scale)
        torch.mul(x, out, out=out)
    return out


def _saved_drops(drop: torch.Tensor, numel: int) -> torch.Tensor:
    """Positions as int32 when the largest possible one fits (half the bytes); anything else as it is."""
    return drop.int() if drop.dtype == torch.int64 and numel - 1 <= _INT32_MAX else drop


class _ApplyDrop(torch.autograd.Function):
    """``y = x * keep * scale``, where ``drop`` holds either the dropped positions or the keep mask.

    ``drop`` is int32 or int64 positions into the memory order ``order`` (position kernel) or a uint8 keep mask
    laid out in that order (mask kernel). Only ``drop`` is saved, positions as int32 when the largest
    possible one fits (any tensor of at most 2**31 elements). Positions run through the compiled kernel
    (``cpu_kernel.drop_scale``, one pass) when it is in use, else through a scaling pass and a scatter. The map
    is diagonal, so its backward is the same map applied to the gradient; under ``create_graph`` it goes
    through this Function again, so double backward works.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float,  # type: ignore[override]
                order: tuple[int, ...], compiled: Optional[bool] = None) -> torch.Tensor:
        # ``compiled``: given by a backward that is itself differentiated, so it runs what its forward ran
        compiled = _positions(drop) and use_cpp() if compiled is None else compiled
        out = _apply_drop(x, drop, scale, order, compiled)
        ctx.save_for_backward(_saved_drops(drop, x.numel()))
        ctx.scale, ctx.order, ctx.compiled = scale, order, compiled
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        (drop,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            return _ApplyDrop.apply(grad, drop, ctx.scale, ctx.order, ctx.compiled), None, None, None, None
        return _apply_drop(grad, drop, ctx.scale, ctx.order, ctx.compiled), None, None, None, None


class _ApplyDropAdd(torch.autograd.Function):
    """``y = act(shortcut + x * keep * scale)`` in one pass: the residual addition (and the block's ReLU when
    ``relu``) fused with ``_ApplyDrop``.

    Forward, with the compiled kernel (``cpu_kernel.drop_add``): one pass that also applies the ReLU. With ATen
    ops: ``torch.add(shortcut, x, alpha=scale)`` (one pass reading both); for the position kernel, in place
    the branch is zeroed at the dropped positions first, out of place the shortcut's values are copied back at
    them after; for the mask kernel ``addcmul`` with the scaled mask; then ``relu_``. Saved: the drops, as
    ``_ApplyDrop``, and the output when ``relu`` (what the ReLU saves on its own). Backward: ``shortcut`` gets
    the ReLU's gradient (or the gradient itself) and ``x`` that under ``_ApplyDrop``'s map; the compiled kernel
    writes both in one pass (``cpu_kernel.drop_add_relu_backward``). ``shortcut`` must have ``x``'s shape,
    dtype and strides (``_cpu_fusable``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: torch.Tensor, drop: torch.Tensor,  # type: ignore[override]
                scale: float, order: tuple[int, ...], inplace: bool = False, relu: bool = False) -> torch.Tensor:
        # in place, as the block's own ``x += shortcut``: no new tensor, so no first-touch page faults on CPU
        # (never when the two share memory: zeroing the branch would zero the shortcut too)
        inplace = inplace and x.untyped_storage().data_ptr() != shortcut.untyped_storage().data_ptr()
        if inplace:
            out = x
            ctx.mark_dirty(x)
        else:
            out = _empty_in_order(x, order)
        compiled = _positions(drop) and use_cpp()
        if compiled:
            cpu_kernel.drop_add(x, shortcut, drop, scale, relu, out)
        elif _positions(drop) and inplace:
            # zero the branch at the drops, then one add pass: a fill of zeros costs about a third of
            # copying the shortcut's values back after the add (a gather plus a scatter), measured on CPU
            flat_x = x.permute(order).view(-1)  # a view: x is dense in this order
            flat_x.scatter_(0, drop.long(), flat_x.new_zeros(drop.numel()))
            torch.add(shortcut, x, alpha=scale, out=out)
        elif _positions(drop):
            torch.add(shortcut, x, alpha=scale, out=out)
            flat_s = shortcut.permute(order).reshape(-1)  # a view: shortcut is dense in this order
            # index_select: 2-3x faster than gather or indexing for sorted positions on CPU (one thread)
            out.permute(order).view(-1).scatter_(0, drop.long(), flat_s.index_select(0, drop))
        else:
            keep = _empty_in_order(x, order)
            keep.permute(order).copy_(drop)
            torch.addcmul(shortcut, x, keep, value=scale, out=out)  # elementwise: out may be x
        if relu and not compiled:
            torch.relu_(out)
        ctx.save_for_backward(_saved_drops(drop, x.numel()), out if relu else None)
        ctx.scale, ctx.order, ctx.relu, ctx.compiled = scale, order, relu, compiled
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        drop, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            if ctx.relu:
                grad = torch.ops.aten.threshold_backward(grad, out, 0)
            return _ApplyDrop.apply(grad, drop, ctx.scale, ctx.order, ctx.compiled), grad, None, None, None, None, None
        if ctx.relu and ctx.compiled:
            grad_x, grad = cpu_kernel.drop_add_relu_backward(_in_order(grad, ctx.order), out, drop, ctx.scale)
            return grad_x, grad, None, None, None, None, None
        if ctx.relu:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        return _apply_drop(grad, drop, ctx.scale, ctx.order, ctx.compiled), grad, None, None, None, None, None


def _cpu_drops(x: torch.Tensor, p: float, order: tuple[int, ...],
               position_max_p: float = POSITION_KERNEL_MAX_P) -> tuple[torch.Tensor, float]:
    """The drops for ``x`` (positions at ``p <= position_max_p``, else a uint8 keep mask) and their scale."""
    if p <= position_max_p:
        return drop_positions(x.numel(), p), 1.0 / (1.0 - p)
    drop_levels = min(int(round(p * _LEVELS)), _LEVELS - 1)  # p < 1 may still round to 65536
    return _keep_mask(x, order, drop_levels), _LEVELS / (_LEVELS - drop_levels)


def _cpu_dropout(x: torch.Tensor, p: float, position_max_p: float = POSITION_KERNEL_MAX_P) -> torch.Tensor:
    """Eager CPU inverted dropout that keeps ``x``'s memory format and saves little for backward.

    * ``p <= POSITION_KERNEL_MAX_P`` (rates such as 0.05 and 0.1): the position kernel. The drops are
      drawn as geometric gaps (``drop_positions``), so the random numbers cost ``p * n`` draws; forward
      and backward are each one scaling pass plus a fill of the dropped positions, and only the
      positions are saved (int32: ``4 p`` bytes per element, 0.4 at p = 0.1). The realised rate is ``p`` up
      to float32 rounding of the inverse CDF (relative error below 1e-6, computed exactly over every
      float32 uniform in the tests) and the scale is ``1 / (1 - p)``, so ``E[y] = x`` to float32 epsilon.
    * larger ``p``: the mask kernel. Four 16-bit uniforms are sliced from each 64-bit draw; the realised
      rate is ``round(p * 65536) / 65536`` (within 8e-6 of ``p``; 65535 / 65536 when ``p`` rounds to
      65536) and the scale uses it exactly, so ``E[y] = x``. A uint8 keep mask (1 byte per element) is saved.

    Both work for any layout: the drops are laid out in ``x``'s memory order and the output has ``x``'s
    strides when ``x`` is dense (contiguous, channels_last), else the same dimension order.
    ``position_max_p`` moves the threshold between the two (benchmarks/dropout_impl.py compares them).
    """
    order = _memory_order(x)
    drop, scale = _cpu_drops(x, p, order, position_max_p)
    return _ApplyDrop.apply(x, drop, scale, order)


def _cpu_fusable(x: torch.Tensor, shortcut: torch.Tensor) -> bool:
    """``_ApplyDropAdd`` takes the pair: same shape, dtype and strides, dense (a view in memory order)."""
    return (shortcut.shape == x.shape and shortcut.dtype == x.dtype and shortcut.stride() == x.stride()
            and x.dim() > 0 and x.permute(_memory_order(x)).is_contiguous())


def _cpu_dropout_add(x: torch.Tensor, shortcut: torch.Tensor, p: float,
                     position_max_p: float = POSITION_KERNEL_MAX_P, inplace: bool = False,
                     relu: bool = False) -> torch.Tensor:
    """``shortcut + _cpu_dropout(x, p)``, then ReLU when ``relu``, with the addition fused into the scaling
    pass (``_ApplyDropAdd``).

    The same drops as ``_cpu_dropout`` draws for the same RNG state. The compiled kernel gives the separate
    ops' result bit for bit; the ATen-op kernel rounds ``shortcut + x * scale`` once instead of twice.
    """
    order = _memory_order(x)
    drop, scale = _cpu_drops(x, p, order, position_max_p)
    return _ApplyDropAdd.apply(x, shortcut, drop, scale, order, inplace, relu)
