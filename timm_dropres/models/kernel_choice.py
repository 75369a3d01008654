"""Which residual dropout kernel runs: the process-wide choice and how it is made.

``layers`` (the ops the models call) and ``cpu_dropout`` (the CPU kernels) read the choice here, so a
forced kernel means the same thing everywhere. Set it with ``set_dropout_kernel``, the ``dropout_kernel``
context manager, or the ``TIMM_DROPRES_DROPOUT_KERNEL`` environment variable (read at import; a bad value
stops the import with the valid choices).

Example:
    >>> from timm_dropres.models import kernel_choice
    >>> with kernel_choice.dropout_kernel('unfused'):
    ...     kernel_choice.get_dropout_kernel()
    'unfused'
    >>> kernel_choice.get_dropout_kernel()
    'auto'
"""

import contextlib
import os
from typing import Final, Iterator

from . import cpu_kernel

__all__ = ['DROPOUT_KERNELS', 'set_dropout_kernel', 'get_dropout_kernel', 'dropout_kernel', 'use_cpp']

#: Values of ``set_dropout_kernel`` (and of the ``TIMM_DROPRES_DROPOUT_KERNEL`` environment variable).
#: ``auto``: on CUDA the Triton kernels (``triton_dropout``: no mask kept, dropout fused with the residual
#: addition and ReLU) when Triton is importable and the tensor is dense and float32/float16/bfloat16; on CPU
#: the CPU kernel fused with the residual addition and ReLU, compiled on first use (``cpu_kernel``) or, where
#: that cannot be built, made of ATen ops; ``torch.native_dropout`` elsewhere. ``unfused``: the op as before
#: issue 22 (``torch.native_dropout`` on CUDA, the unfused CPU kernel of ATen ops, the addition and activation
#: as separate ops). ``ops``: only stock ATen ops, nothing compiled (the fused CPU kernel of ATen ops,
#: ``torch.native_dropout`` on CUDA). ``cpp``: the compiled CPU kernel, an error if it cannot be built (other
#: devices as under ``ops``). The compiled kernel serves the position kernel's rates (``p <= 0.125``); above, the
#: uint8 mask kernel runs in ATen ops under every choice.
#: ``triton``: the Triton kernels wherever a tensor allows it, an error if Triton cannot be imported; on CPU
#: tensors that needs ``TRITON_INTERPRET=1`` (Triton's interpreter, for testing). Under ``torch.compile`` and
#: ``torch.export`` only ``triton`` changes what runs: the kernels as custom ops
#: (``triton_dropout.seeded_dropout_add``: no mask kept, but opaque to inductor's fusion) instead of
#: ``native_dropout``, which inductor fuses with its neighbours and whose mask it keeps. Which of the two is
#: faster on a GPU is for ``benchmarks/gpu_check.sh`` to measure, so ``auto`` keeps ``native_dropout`` there.
DROPOUT_KERNELS: Final[tuple[str, ...]] = ('auto', 'unfused', 'ops', 'cpp', 'triton')
_ENV_KERNEL = 'TIMM_DROPRES_DROPOUT_KERNEL'


def _check_kernel(name: object, source: str) -> str:
    if name not in DROPOUT_KERNELS:
        raise ValueError(f'{source} must be one of {list(DROPOUT_KERNELS)}, got {name!r}')
    return str(name)


_kernel = _check_kernel(os.environ.get(_ENV_KERNEL, 'auto'), _ENV_KERNEL)


def set_dropout_kernel(name: str) -> str:
    """Choose the residual dropout kernel process-wide (see ``DROPOUT_KERNELS``); returns the previous choice.

    Args:
        name: ``'auto'`` (default), ``'unfused'`` (force the op as before the fused kernels), ``'ops'``
            (nothing compiled), ``'cpp'`` (force the compiled CPU kernel) or ``'triton'``.

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


def use_cpp() -> bool:
    """Whether the compiled CPU kernel runs the position kernel's passes: under ``auto`` where it builds
    (building it on the first call), always under ``cpp`` (raising, with the reason, where it cannot be built).

    Raises:
        RuntimeError: ``cpp`` is forced and the kernel cannot be built.
    """
    if _kernel == 'cpp':
        cpu_kernel.load()  # raises, saying why, where it cannot be built
        return True
    return _kernel == 'auto' and cpu_kernel.available()
