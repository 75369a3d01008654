"""The dropout module, the placement vocabulary, and argument validation.

Everything that names a position or checks a rate lives here, so the blocks, the factory,
``convert`` and the CLIs all speak the same words and raise the same errors.
"""

import contextlib
import functools
import importlib.util
import math
import os
from typing import Final, Iterator, Optional

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

__all__ = [
    'ResidualDropout', 'residual_dropout', 'residual_dropout_add', 'fuse_with_add', 'drop_positions',
    'geometric_gaps', 'POSITION_KERNEL_MAX_P', 'DROPOUT_KERNELS', 'set_dropout_kernel', 'get_dropout_kernel',
    'dropout_kernel',
    'AFTER_LAST_BN', 'BEFORE_LAST_CONV', 'AUTO', 'HEAD_BEFORE_POOL',
    'RES_DROP_POSITIONS', 'DEFAULT_RES_DROP_RATE', 'DEFAULT_HEAD_DROP_RATE', 'DEFAULT_POST_ACT_POS',
    'check_rate', 'check_position', 'check_dropout_args',
]

AFTER_LAST_BN: Final[str] = 'after_last_bn'
BEFORE_LAST_CONV: Final[str] = 'before_last_conv'
AUTO: Final[str] = 'auto'
HEAD_BEFORE_POOL: Final[str] = 'head_before_pool'

#: Values accepted for ``res_drop_pos``.
RES_DROP_POSITIONS: Final[tuple[str, ...]] = (AUTO, AFTER_LAST_BN, BEFORE_LAST_CONV)

#: Defaults, set from the three engine studies (docs/results/{transfer,underfit,overfit}/*_engine.md, README
#: "Defaults"): both rates are off, as in timm, and a user turns them on by name. Residual dropout never raised
#: top-1 and cost 0.75-1.95 points in short training from scratch; head dropout before pooling at 0.1 had no
#: resolved top-1 effect in any study (smallest detectable 0.17-0.55 points) and a small calibration cost when
#: fine-tuning. Where they go when turned on is the guideline's position.
DEFAULT_RES_DROP_RATE: Final[float] = 0.0
DEFAULT_HEAD_DROP_RATE: Final[float] = 0.0
#: What ``auto`` means for post-activation blocks (pre-activation blocks have a single position).
DEFAULT_POST_ACT_POS: Final[str] = AFTER_LAST_BN


def check_rate(name: str, value: object) -> float:
    """Return ``value`` as a float in [0, 1), or raise ``ValueError`` naming it.

    p == 1 is rejected: inverted dropout would divide by zero and the branch would carry nothing.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{name} must be a float in [0, 1), got {value!r} ({type(value).__name__})')
    rate = float(value)
    if math.isnan(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {value!r}')
    return rate


def check_position(value: object) -> str:
    """Return ``value`` if it is a known ``res_drop_pos``, else raise ``ValueError`` listing the choices."""
    if value not in RES_DROP_POSITIONS:
        raise ValueError(f'res_drop_pos must be one of {list(RES_DROP_POSITIONS)}, got {value!r}')
    return str(value)


def check_dropout_args(
        drop_rate: object = None, res_drop_rate: object = None, res_drop_pos: object = None,
) -> tuple[float | None, float | None, str | None]:
    """Validate the three dropout arguments at once; ``None`` means "not given" and passes through.

    Args:
        drop_rate: head dropout rate, in [0, 1).
        res_drop_rate: residual dropout rate, in [0, 1).
        res_drop_pos: one of ``RES_DROP_POSITIONS``.

    Returns:
        ``(drop_rate, res_drop_rate, res_drop_pos)`` with the rates as floats.

    Raises:
        ValueError: listing every bad argument with its value and the valid range or choices.

    Example:
        >>> check_dropout_args(0.1, 0.05, 'auto')
        (0.1, 0.05, 'auto')
    """
    out: list = []
    errors = []
    for name, value, check in (('drop_rate', drop_rate, check_rate), ('res_drop_rate', res_drop_rate, check_rate),
                               ('res_drop_pos', res_drop_pos, lambda _n, v: check_position(v))):
        if value is None:
            out.append(None)
            continue
        try:
            out.append(check(name, value))
        except ValueError as e:
            errors.append(str(e))
            out.append(None)
    if errors:
        raise ValueError('invalid dropout arguments: ' + '; '.join(errors))
    return out[0], out[1], out[2]


#: Rates up to this use the position kernel (saved positions cost 4p bytes per element as int32, 8p
#: as int64 for tensors over 2**31 elements); above it the uint8 mask kernel (1 byte) is faster: the two
#: tie at 0.15 on ResNet-50 (docs/benchmarks.md, "Re-measured at explicit rates").
POSITION_KERNEL_MAX_P: Final[float] = 0.125
_LEVELS = 1 << 16  # resolution of the mask kernel's uniforms
_INT32_MAX = (1 << 31) - 1


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


def drop_positions(n: int, p: float, draws: int | None = None) -> torch.Tensor:
    """Sorted positions in ``[0, n)`` of the drops of ``n`` i.i.d. Bernoulli(``p``) trials.

    Draws about ``n * p`` geometric gaps (``geometric_gaps``) instead of ``n`` uniforms, so the cost
    scales with the number of drops. The gaps cover ``n`` with overwhelming probability at the first
    draw (6 standard deviations of margin); otherwise more are drawn.

    Args:
        n: number of trials (elements).
        p: drop probability in (0, 1).
        draws: gaps drawn at a time (default: the expected number of drops plus 6 standard deviations,
            which covers ``n`` at the first draw with overwhelming probability).

    Returns:
        1-D int64 tensor of strictly increasing positions, on the CPU.

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
    positions = geometric_gaps(torch.rand(draws), p).cumsum(0, dtype=torch.int64).sub_(1)
    count = int(torch.searchsorted(positions, n))
    while count == positions.numel():  # every drop drawn so far lies inside [0, n): draw on
        more = geometric_gaps(torch.rand(draws), p).cumsum(0, dtype=torch.int64).add_(positions[-1])
        positions = torch.cat([positions, more])
        count = int(torch.searchsorted(positions, n))
    return positions[:count]


def _keep_mask(x: torch.Tensor, order: tuple[int, ...], drop_levels: int) -> torch.Tensor:
    """uint8 keep mask (1 = keep) in ``x``'s memory order, from 16-bit uniforms sliced from 64-bit draws."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    uniform = bits.view(torch.int16)[:n].view([x.shape[d] for d in order])
    keep = torch.empty(uniform.shape, dtype=torch.uint8)
    return torch.ge(uniform, drop_levels - _LEVELS // 2, out=keep)


def _apply_drop(x: torch.Tensor, drop: torch.Tensor, scale: float, order: tuple[int, ...]) -> torch.Tensor:
    """``x * keep * scale`` as a new tensor laid out in ``order``; see ``_ApplyDrop`` for ``drop``."""
    out = _empty_in_order(x, order)
    if drop.dtype == torch.int64:
        torch.mul(x, scale, out=out)
        # scatter_ from a zero tensor: about half the time of index_fill_ per position on CPU
        out.permute(order).view(-1).scatter_(0, drop, out.new_zeros(drop.numel()))
    else:
        out.permute(order).copy_(drop)
        out.mul_(scale)
        torch.mul(x, out, out=out)
    return out


class _ApplyDrop(torch.autograd.Function):
    """``y = x * keep * scale``, where ``drop`` holds either the dropped positions or the keep mask.

    ``drop`` is int64 positions into the memory order ``order`` (position kernel) or a uint8 keep mask
    laid out in that order (mask kernel). Only ``drop`` is saved, positions as int32 when the largest
    possible one fits (any tensor of at most 2**31 elements) and converted back for backward. The map
    is diagonal, so its backward is the same map applied to the gradient; under ``create_graph`` it goes
    through this Function again, so double backward works.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float,  # type: ignore[override]
                order: tuple[int, ...]) -> torch.Tensor:
        out = _apply_drop(x, drop, scale, order)
        # positions (all below numel) are kept as int32 when they fit: half the bytes; scatter_ needs int64
        fits = drop.dtype == torch.int64 and x.numel() - 1 <= _INT32_MAX
        ctx.save_for_backward(drop.int() if fits else drop)
        ctx.scale, ctx.order = scale, order
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (drop,) = ctx.saved_tensors
        if drop.dtype == torch.int32:
            drop = drop.long()
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            return _ApplyDrop.apply(grad, drop, ctx.scale, ctx.order), None, None, None
        return _apply_drop(grad, drop, ctx.scale, ctx.order), None, None, None


class _ApplyDropAdd(torch.autograd.Function):
    """``y = shortcut + x * keep * scale`` in one pass (the residual addition fused with ``_ApplyDrop``).

    Forward: ``torch.add(shortcut, x, alpha=scale)`` (one pass reading both); for the position kernel, in
    place the branch is zeroed at the dropped positions first, out of place the shortcut's values are copied
    back at them after; for the mask kernel ``addcmul`` with the scaled mask. Saved: the drops only, as
    ``_ApplyDrop``. Backward: ``shortcut`` gets the gradient itself and ``x`` the same map as ``_ApplyDrop``.
    ``shortcut`` must have ``x``'s shape, dtype and strides (``_cpu_fusable``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: torch.Tensor, drop: torch.Tensor,  # type: ignore[override]
                scale: float, order: tuple[int, ...], inplace: bool = False) -> torch.Tensor:
        # in place, as the block's own ``x += shortcut``: no new tensor, so no first-touch page faults on CPU
        # (never when the two share memory: zeroing the branch would zero the shortcut too)
        inplace = inplace and x.untyped_storage().data_ptr() != shortcut.untyped_storage().data_ptr()
        if inplace:
            out = x
            ctx.mark_dirty(x)
        else:
            out = _empty_in_order(x, order)
        if drop.dtype == torch.int64 and inplace:
            # zero the branch at the drops, then one add pass: a fill of zeros costs about a third of
            # copying the shortcut's values back after the add (a gather plus a scatter), measured on CPU
            flat_x = x.permute(order).view(-1)  # a view: x is dense in this order
            flat_x.scatter_(0, drop, flat_x.new_zeros(drop.numel()))
            torch.add(shortcut, x, alpha=scale, out=out)
        elif drop.dtype == torch.int64:
            torch.add(shortcut, x, alpha=scale, out=out)
            flat_s = shortcut.permute(order).reshape(-1)  # a view: shortcut is dense in this order
            # index_select: 2-3x faster than gather or indexing for sorted positions on CPU (one thread)
            out.permute(order).view(-1).scatter_(0, drop, flat_s.index_select(0, drop))
        else:
            keep = _empty_in_order(x, order)
            keep.permute(order).copy_(drop)
            torch.addcmul(shortcut, x, keep, value=scale, out=out)  # elementwise: out may be x
        fits = drop.dtype == torch.int64 and x.numel() - 1 <= _INT32_MAX
        ctx.save_for_backward(drop.int() if fits else drop)
        ctx.scale, ctx.order = scale, order
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (drop,) = ctx.saved_tensors
        if drop.dtype == torch.int32:
            drop = drop.long()
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            return _ApplyDrop.apply(grad, drop, ctx.scale, ctx.order), grad, None, None, None, None
        return _apply_drop(grad, drop, ctx.scale, ctx.order), grad, None, None, None, None


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
                     position_max_p: float = POSITION_KERNEL_MAX_P, inplace: bool = False) -> torch.Tensor:
    """``shortcut + _cpu_dropout(x, p)`` with the addition fused into the scaling pass (``_ApplyDropAdd``).

    The same drops as ``_cpu_dropout`` draws for the same RNG state, so the two agree at equal seeds up to the
    rounding of ``shortcut + x * scale`` (one fused rounding instead of two).
    """
    order = _memory_order(x)
    drop, scale = _cpu_drops(x, p, order, position_max_p)
    return _ApplyDropAdd.apply(x, shortcut, drop, scale, order, inplace)


#: Values of ``set_dropout_kernel`` (and of the ``TIMM_DROPRES_DROPOUT_KERNEL`` environment variable).
#: ``auto``: on CUDA the Triton kernels (``triton_dropout``: no mask kept, dropout fused with the residual
#: addition and ReLU) when Triton is importable and the tensor is dense and float32/float16/bfloat16; on CPU
#: the CPU kernel, fused with the residual addition; ``torch.native_dropout`` elsewhere. ``unfused``: the op
#: as before issue 22 (``torch.native_dropout`` on CUDA, the unfused CPU kernel, the addition and activation
#: as separate ops). ``triton``: the Triton kernels wherever a tensor allows it, an error if Triton cannot
#: be imported; on CPU tensors that needs ``TRITON_INTERPRET=1`` (Triton's interpreter, for testing).
DROPOUT_KERNELS: Final[tuple[str, ...]] = ('auto', 'unfused', 'triton')
_ENV_KERNEL = 'TIMM_DROPRES_DROPOUT_KERNEL'


def _check_kernel(name: object, source: str) -> str:
    if name not in DROPOUT_KERNELS:
        raise ValueError(f'{source} must be one of {list(DROPOUT_KERNELS)}, got {name!r}')
    return str(name)


_kernel = _check_kernel(os.environ.get(_ENV_KERNEL, 'auto'), _ENV_KERNEL)


def set_dropout_kernel(name: str) -> str:
    """Choose the residual dropout kernel process-wide (see ``DROPOUT_KERNELS``); returns the previous choice.

    Args:
        name: ``'auto'`` (default), ``'unfused'`` (force the op as before the fused kernels) or ``'triton'``.

    Returns:
        The choice that was in effect.

    Raises:
        ValueError: ``name`` is not one of ``DROPOUT_KERNELS``.
    """
    global _kernel
    previous, _kernel = _kernel, _check_kernel(name, 'dropout kernel')
    return previous


def get_dropout_kernel() -> str:
    """The current choice of ``set_dropout_kernel``."""
    return _kernel


@contextlib.contextmanager
def dropout_kernel(name: str) -> Iterator[None]:
    """``set_dropout_kernel(name)`` for the duration of a ``with`` block (restored on exit, also on error)."""
    previous = set_dropout_kernel(name)
    try:
        yield
    finally:
        set_dropout_kernel(previous)


@functools.cache
def _triton_device_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton importable and able to run on ``device`` (CUDA: compute capability 7.0+, 8.0+ for bfloat16)."""
    if importlib.util.find_spec('triton') is None:
        return False
    try:
        from . import triton_dropout  # noqa: F401  (a broken Triton install: the other kernels)
    except Exception:  # noqa: BLE001 - any import failure means "not usable", never a failed training step
        return False
    if device.type == 'cuda':
        major, _ = torch.cuda.get_device_capability(device)
        return major >= (8 if dtype == torch.bfloat16 else 7)
    return device.type == 'cpu' and os.environ.get('TRITON_INTERPRET', '0') == '1'


def _use_triton(x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> bool:
    """The automatic choice (or the forced ``triton``) of the Triton kernels for this call."""
    if _kernel == 'unfused' or (_kernel == 'auto' and not x.is_cuda):
        return False
    if not _triton_device_ok(x.device, x.dtype):
        if _kernel == 'triton':
            raise RuntimeError(f'dropout kernel "triton" was forced but cannot run on {x.device} ({x.dtype}): '
                               'needs Triton importable and a CUDA device (compute capability 7.0+, 8.0+ for '
                               'bfloat16), or CPU tensors under TRITON_INTERPRET=1')
        return False
    from . import triton_dropout
    return triton_dropout.usable(x, shortcut)


def _triton_dropout_add(x: torch.Tensor, shortcut: Optional[torch.Tensor], p: float, relu: bool,
                        inplace: bool = False) -> torch.Tensor:
    from . import triton_dropout
    return triton_dropout.dropout_add(x, shortcut, p, relu, inplace)


def fuse_with_add(module: nn.Module) -> bool:
    """Whether a block should call ``residual_dropout_add`` instead of ``module`` then the addition.

    True in a train-mode forward with autograd on, at ``p > 0``, unless the kernel is ``unfused``. Without
    autograd (``torch.no_grad``: the placement audit, the module tests) the blocks keep their separate ops,
    so tools that watch ``res_drop`` and the addition see them as before; eval never changes.
    """
    return bool(module.training and module.p > 0.0 and torch.is_grad_enabled() and _kernel != 'unfused')


@torch.fx.wrap
@register_notrace_function
def residual_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: what ``ResidualDropout`` runs, as a function ``torch.fx`` keeps as one call.

    Wrapped the way timm wraps its own functions (``torch.fx.wrap`` and timm's
    ``register_notrace_function``), so symbolic tracing records a single call in both modes instead of
    tracing the device checks, and a traced graph still runs the eager CPU kernel. As for timm's
    ``DropPath``, the mode is fixed when a graph is traced: trace in the mode the graph will run in
    (timm's and torchvision's feature extractors trace both).

    When not training or ``p == 0`` it returns ``x`` itself, without running any op. Otherwise, in eager
    mode (not scripting, tracing or compiling): on CUDA the Triton kernel that keeps no mask (``triton_dropout``,
    see ``DROPOUT_KERNELS`` for the automatic choice and how to force the previous op), on CPU
    ``_cpu_dropout``; everywhere else ``torch.native_dropout``, which TorchScript runs, ``torch.compile``
    fuses with its neighbours and ``torch.export`` records.

    Args:
        x: activations.
        p: drop probability in [0, 1).
        training: drop only when true.

    Returns:
        ``x`` itself, or a new tensor with each element zeroed with probability ``p`` and the others
        scaled by the inverse keep probability.
    """
    if not training or p == 0.0:
        return x
    if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
        if not torch.jit.is_tracing():  # torch.jit.trace would record a custom kernel's drops as constants
            if _use_triton(x, None):
                return _triton_dropout_add(x, None, p, False)
            if x.device.type == 'cpu':
                return _cpu_dropout(x, p)
    return torch.native_dropout(x, p, True)[0]


def _eager_dropout_add(x: torch.Tensor, shortcut: torch.Tensor, p: float, relu: bool,
                       inplace: bool) -> Optional[torch.Tensor]:
    """The fused kernels in eager mode, or ``None`` where none takes the pair (the caller runs separate ops)."""
    if _use_triton(x, shortcut):
        return _triton_dropout_add(x, shortcut, p, relu, inplace)
    if _kernel != 'unfused' and x.device.type == 'cpu' and _cpu_fusable(x, shortcut):
        out = _cpu_dropout_add(x, shortcut, p, inplace=inplace)
        return torch.relu_(out) if relu else out
    return None


@torch.fx.wrap
@register_notrace_function
def residual_dropout_add(x: torch.Tensor, shortcut: torch.Tensor, p: float, training: bool = True,
                         relu: bool = False, inplace: bool = False) -> torch.Tensor:
    """``shortcut + residual_dropout(x, p, training)``, then ReLU when ``relu``: one op where a kernel allows.

    What the post-activation blocks call at ``after_last_bn`` when ``fuse_with_add`` says so (and no
    stochastic depth sits between the dropout and the addition). In eager mode, on CUDA, one Triton kernel
    each way that keeps no mask (``triton_dropout``); on CPU the CPU kernel with the addition in its scaling
    pass (``_cpu_dropout_add``; the ReLU runs in place after it, as the block's activation would). Under
    ``torch.compile``, ``torch.export``, TorchScript and ``torch.jit.trace``, and for any pair a kernel
    cannot take (other dtypes, layouts or devices, a shortcut with other strides), the separate ops, which
    inductor fuses itself.
    Wrapped for ``torch.fx`` like ``residual_dropout``.

    Args:
        x: the residual branch.
        shortcut: added to the dropped branch (``x``'s shape).
        p: drop probability in [0, 1).
        training: drop only when true.
        relu: apply ReLU to the sum (the block's final activation, when it is ``nn.ReLU``).
        inplace: the fused kernels may write the result into ``x`` (as the blocks' own ``x += shortcut``
            does; autograd raises if something saved ``x``). The separate ops never do.

    Returns:
        A new tensor: ``relu(shortcut + dropout(x))`` or ``shortcut + dropout(x)``.
    """
    if training and p != 0.0 and not torch.jit.is_scripting():
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            fused = _eager_dropout_add(x, shortcut, p, relu, inplace)
            if fused is not None:
                return fused
    out = residual_dropout(x, p, training)
    # the dropout's output is a new tensor: add in place, as the blocks' separate ops do (never into x itself)
    out = out.add_(shortcut) if training and p != 0.0 else out + shortcut
    return torch.relu_(out) if relu else out


class ResidualDropout(nn.Dropout):
    """Element-wise inverted dropout that knows where it sits.

    A subclass of ``nn.Dropout`` so every tool that looks for dropout finds it. It adds ``where``
    (the placement, shown by ``print(model)``) and skips the kernel entirely when it cannot act
    (eval mode or p == 0): the output is then the input tensor itself, so eval-mode outputs are
    bit-identical to the base model and no RNG state is consumed.

    Training runs ``residual_dropout``: in eager CUDA training a Triton kernel that keeps no mask (the
    Philox seed is saved and the mask regenerated in backward; ``triton_dropout``), in eager CPU training
    ``_cpu_dropout`` (the position kernel at rates up to 0.125: random numbers for the drops only, one pass
    each way, 0.4 bytes per element saved at p = 0.1), elsewhere ``torch.native_dropout`` (with a 1-byte
    mask). Post-activation blocks at ``after_last_bn`` call ``residual_dropout_add`` with this module's
    ``p`` instead of calling the module, in train mode with autograd on (``fuse_with_add``), so the
    dropout shares one pass with the residual addition (and ReLU). ``set_dropout_kernel('unfused')`` forces
    the previous behaviour. See docs/benchmarks.md, "Issue 14" and "Issue 22". Traceable by ``torch.fx``,
    timm's FX feature extraction, TorchScript, ``torch.compile`` (no graph break) and ``torch.export``.

    Args:
        p: drop probability in [0, 1).
        where: the placement, one of the position names (``after_last_bn``, ``before_last_conv``,
            ``head_before_pool``); informational.

    Raises:
        ValueError: ``p`` is not a float in [0, 1).
    """

    where: str

    def __init__(self, p: float = 0.0, where: str = AFTER_LAST_BN) -> None:
        super().__init__(p=check_rate('p', p), inplace=False)
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return residual_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f'p={self.p}, where={self.where}'
