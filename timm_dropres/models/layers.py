"""The dropout module, the placement vocabulary, and argument validation.

Everything that names a position or checks a rate lives here, so the blocks, the factory,
``convert`` and the CLIs all speak the same words and raise the same errors.
"""

import math
from typing import Final

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

__all__ = [
    'ResidualDropout', 'residual_dropout', 'drop_positions', 'geometric_gaps', 'POSITION_KERNEL_MAX_P',
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

#: Defaults, set from the transfer study (docs/results/transfer/, README "Defaults"), because most users
#: fine-tune: there no residual rate helped and every one cost top-1 (-0.2 points at 0.05, more above), while
#: head dropout before pooling at 0.1 cost nothing measurable. Residual dropout is therefore off unless asked
#: for (``res_drop_rate=0.1`` where a model trained from scratch over-fits: docs/results/overfit/).
DEFAULT_RES_DROP_RATE: Final[float] = 0.0
DEFAULT_HEAD_DROP_RATE: Final[float] = 0.1
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
    if p <= position_max_p:
        return _ApplyDrop.apply(x, drop_positions(x.numel(), p), 1.0 / (1.0 - p), order)
    drop_levels = min(int(round(p * _LEVELS)), _LEVELS - 1)  # p < 1 may still round to 65536
    return _ApplyDrop.apply(x, _keep_mask(x, order, drop_levels), _LEVELS / (_LEVELS - drop_levels), order)


@torch.fx.wrap
@register_notrace_function
def residual_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: what ``ResidualDropout`` runs, as a function ``torch.fx`` keeps as one call.

    Wrapped the way timm wraps its own functions (``torch.fx.wrap`` and timm's
    ``register_notrace_function``), so symbolic tracing records a single call in both modes instead of
    tracing the device checks, and a traced graph still runs the eager CPU kernel. As for timm's
    ``DropPath``, the mode is fixed when a graph is traced: trace in the mode the graph will run in
    (timm's and torchvision's feature extractors trace both).

    When not training or ``p == 0`` it returns ``x`` itself, without running any op. Otherwise, on CPU
    in eager mode (not scripting, not compiling) it runs ``_cpu_dropout``, and everywhere else
    ``torch.native_dropout``, which TorchScript runs, ``torch.compile`` fuses with its neighbours and
    ``torch.export`` records.

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
    if x.device.type == 'cpu' and not torch.jit.is_scripting() and not torch.compiler.is_compiling():
        return _cpu_dropout(x, p)
    return torch.native_dropout(x, p, True)[0]


class ResidualDropout(nn.Dropout):
    """Element-wise inverted dropout that knows where it sits.

    A subclass of ``nn.Dropout`` so every tool that looks for dropout finds it. It adds ``where``
    (the placement, shown by ``print(model)``) and skips the kernel entirely when it cannot act
    (eval mode or p == 0): the output is then the input tensor itself, so eval-mode outputs are
    bit-identical to the base model and no RNG state is consumed.

    Training runs ``residual_dropout``: in eager CPU training ``_cpu_dropout`` (the position kernel at
    rates up to 0.125: random numbers for the drops only, one pass each way, 0.4 bytes per element
    saved at p = 0.1), elsewhere ``torch.native_dropout`` (the fused op ``F.dropout`` uses on CUDA,
    with a 1-byte mask). See docs/benchmarks.md, "Issue 14". Traceable by ``torch.fx``, timm's
    FX feature extraction, TorchScript, ``torch.compile`` (no graph break) and ``torch.export``.

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
