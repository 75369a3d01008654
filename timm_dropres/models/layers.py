"""The dropout module, the placement vocabulary, and argument validation.

Everything that names a position or checks a rate lives here, so the blocks, the factory,
``convert`` and the CLIs all speak the same words and raise the same errors.
"""

import math
from typing import Final

import torch
import torch.nn as nn

__all__ = [
    'ResidualDropout',
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


_LEVELS = 1 << 16  # mask resolution of _cpu_dropout


def _cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a 16-bit uniform per element, sliced from 64-bit draws.

    PyTorch's CPU dropout draws one 32/64-bit number per element, which makes the RNG most of a
    dropout's cost; four 16-bit slices of one 64-bit draw are as uniform at 1/65536 resolution. The
    realised rate is ``round(p * 65536) / 65536`` (within 8e-6 of ``p``) and the scale uses it exactly,
    so the expectation is unchanged. Only the bool mask is kept for backward, as in ``native_dropout``.
    """
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not (channels_last or x.is_contiguous()):
        return torch.native_dropout(x, p, True)[0]
    # build the mask in memory order so a channels_last input gives a channels_last output
    order = (0, 2, 3, 1) if channels_last else tuple(range(x.dim()))
    drop = int(round(p * _LEVELS))
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    uniform = bits.view(torch.int16)[:n].view([x.shape[d] for d in order])
    keep = uniform >= drop - (_LEVELS // 2)
    if channels_last:
        keep = keep.permute(0, 3, 1, 2)
    return (x * keep).mul_(_LEVELS / (_LEVELS - drop))


class ResidualDropout(nn.Dropout):
    """Element-wise inverted dropout that knows where it sits.

    A subclass of ``nn.Dropout`` so every tool that looks for dropout finds it. It adds ``where``
    (the placement, shown by ``print(model)``) and skips the kernel entirely when it cannot act
    (eval mode or p == 0): the output is then the input tensor itself, so eval-mode outputs are
    bit-identical to the base model and no RNG state is consumed.

    Training calls ``torch.native_dropout`` (the fused op ``F.dropout`` uses on CUDA; it keeps a 1-byte
    mask where CPU ``F.dropout`` keeps a 4-byte one), except in eager CPU training, where
    ``_cpu_dropout`` draws the mask 4x faster (docs/benchmarks.md, figures 2 and 3).
    """

    where: str

    def __init__(self, p: float = 0.0, where: str = AFTER_LAST_BN) -> None:
        super().__init__(p=check_rate('p', p), inplace=False)
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type == 'cpu' and not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            return _cpu_dropout(x, self.p)
        return torch.native_dropout(x, self.p, True)[0]

    def extra_repr(self) -> str:
        return f'p={self.p}, where={self.where}'
