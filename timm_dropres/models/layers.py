"""The dropout module, the placement vocabulary, and argument validation.

Everything that names a position or checks a rate lives here, so the blocks, the factory,
``convert`` and the CLIs all speak the same words and raise the same errors.
"""

import functools
import importlib.util
import math
import os
from typing import Final, Optional

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from .cpu_dropout import (
    POSITION_KERNEL_MAX_P,
    _cpu_dropout,
    _cpu_dropout_add,
    _cpu_fusable,
    drop_positions,
    geometric_gaps,
    uniforms,
)
from .kernel_choice import (
    DROPOUT_KERNELS,
    dropout_kernel,
    get_dropout_kernel,
    set_dropout_kernel,
)

__all__ = [
    'ResidualDropout', 'residual_dropout', 'residual_dropout_add', 'fuse_with_add', 'drop_positions',
    'geometric_gaps', 'uniforms', 'POSITION_KERNEL_MAX_P', 'DROPOUT_KERNELS', 'set_dropout_kernel',
    'get_dropout_kernel', 'dropout_kernel',
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
    kernel = get_dropout_kernel()
    if kernel not in ('auto', 'triton') or (kernel == 'auto' and not x.is_cuda):
        return False
    # traced by torch.compile (_compiled_triton): there the cache wrapper is skipped (Dynamo would warn about it)
    device_ok = _triton_device_ok.__wrapped__ if torch.compiler.is_compiling() else _triton_device_ok
    if not device_ok(x.device, x.dtype):
        if kernel == 'triton':
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
    return bool(module.training and module.p > 0.0 and torch.is_grad_enabled() and get_dropout_kernel() != 'unfused')


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
    fuses with its neighbours and ``torch.export`` records (with the kernel forced to ``triton``, compile and
    export call the Triton kernels as custom ops instead: ``_compiled_triton``).

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
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
        out = _compiled_triton(x, None, p, False)
        if out is not None:
            return out
    elif not torch.jit.is_scripting() and not torch.jit.is_tracing():  # jit.trace: drops baked in as constants
        if _use_triton(x, None):
            return _triton_dropout_add(x, None, p, False)
        if x.device.type == 'cpu':
            return _cpu_dropout(x, p)
    return torch.native_dropout(x, p, True)[0]


def _compiled_triton(x: torch.Tensor, shortcut: Optional[torch.Tensor], p: float, relu: bool
                     ) -> Optional[torch.Tensor]:
    """Under ``torch.compile`` / ``torch.export`` with the kernel forced to ``triton``: the Triton kernels as
    custom ops (``triton_dropout.seeded_dropout_add``: no mask kept), or ``None`` (``native_dropout``, which
    inductor fuses with its neighbours but whose mask it keeps; the default until a GPU measures the two)."""
    if get_dropout_kernel() != 'triton' or not _use_triton(x, shortcut):  # raises where Triton cannot run
        return None
    from . import triton_dropout
    return triton_dropout.seeded_dropout_add(x, shortcut, triton_dropout.draw_seed(x.device), p, relu)


def _eager_dropout_add(x: torch.Tensor, shortcut: torch.Tensor, p: float, relu: bool,
                       inplace: bool) -> Optional[torch.Tensor]:
    """The fused kernels in eager mode, or ``None`` where none takes the pair (the caller runs separate ops)."""
    if _use_triton(x, shortcut):
        return _triton_dropout_add(x, shortcut, p, relu, inplace)
    if get_dropout_kernel() != 'unfused' and x.device.type == 'cpu' and _cpu_fusable(x, shortcut):
        return _cpu_dropout_add(x, shortcut, p, inplace=inplace, relu=relu)
    return None


@torch.fx.wrap
@register_notrace_function
def residual_dropout_add(x: torch.Tensor, shortcut: torch.Tensor, p: float, training: bool = True,
                         relu: bool = False, inplace: bool = False) -> torch.Tensor:
    """``shortcut + residual_dropout(x, p, training)``, then ReLU when ``relu``: one op where a kernel allows.

    What the post-activation blocks call at ``after_last_bn`` when ``fuse_with_add`` says so (and no
    stochastic depth sits between the dropout and the addition). In eager mode, on CUDA, one Triton kernel
    each way that keeps no mask (``triton_dropout``); on CPU one pass each way that also adds and applies the
    ReLU (``_cpu_dropout_add``: the compiled ``cpu_kernel``, or its ATen-op version). Under ``torch.compile``
    and ``torch.export`` the separate ops, which inductor fuses itself, or with the kernel forced to
    ``triton`` the Triton kernels as custom ops (``_compiled_triton``). Under TorchScript and
    ``torch.jit.trace``, and for any pair a kernel cannot take (other dtypes, layouts or devices, a shortcut
    with other strides), the separate ops.
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
        if torch.compiler.is_compiling():
            fused = _compiled_triton(x, shortcut, p, relu)
        elif not torch.jit.is_tracing():
            fused = _eager_dropout_add(x, shortcut, p, relu, inplace)
        else:
            fused = None
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
