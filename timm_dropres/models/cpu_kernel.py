"""The compiled CPU kernel of residual dropout: the drops applied inside one pass each way, fused with the add.

The CPU position kernel in ``layers`` is made of ATen ops: a scaling pass, then a scatter that zeroes the
drops, each way; in a post-activation block the residual addition, the ReLU and the ReLU's backward are
passes of their own. ATen has no op that applies a list of drop positions inside an elementwise pass, so
these are written in C++ (``csrc/dropout_cpu.cpp``) and compiled on first use with PyTorch's JIT extension
builder (``torch.utils.cpp_extension.load``, which needs a C++ compiler and ``ninja``). Per element:

* ``drop_add``: ``act(shortcut + x * scale)``, ``act(shortcut)`` at the drops, written into ``x`` (the
  block's own ``x += shortcut``, then its ReLU in the same pass);
* ``drop_add_relu_backward``: the ReLU's gradient for the shortcut, and that times ``scale`` with zeros at
  the drops for the branch, in one pass;
* ``drop_scale``: ``src * scale`` with zeros at the drops (the dropout alone, and its backward);
* ``geometric_positions_``: the drop positions from random words, as ``cpu_dropout.drop_positions``' op chain
  computes them (eleven passes), in three, the middle one the same ``torch.log_``.

The results equal the ATen ops bit for bit (the passes at equal drops) (the scaled branch is rounded to the
dtype before the addition, as ``torch.mul`` then ``add_`` round), for float32, float64, float16 and
bfloat16. The loops run on torch's intra-op thread pool (``torch.set_num_threads``). Each function below builds
the kernel first if this process has not (raising ``RuntimeError``, with the reason, where it cannot), and the
C++ checks every argument before it writes anything (``RuntimeError`` naming the argument): devices, dtypes,
shapes, strides, density, positions strictly increasing and in range, and a written tensor either the very
tensor it reads or sharing no memory with it.

The build is cached in ``$TORCH_EXTENSIONS_DIR/<name>`` (default ``~/.cache/torch_extensions``), where the
name hashes the source, the flags, the torch version and the CPU capability, so an upgrade rebuilds instead
of loading a stale library. It takes about 15 s once per machine. Processes that start together (DDP ranks,
``dropres-study`` workers) build it once: ``torch.utils.cpp_extension`` locks the build directory while it
builds, and the others wait. (Older torch versions locked it with a file that a build killed midway leaves
behind, and then wait for it without end: delete ``build_directory() / 'lock'`` if that happens.) A process
that cannot build the kernel (no compiler or ``ninja``) logs why once, and ``layers`` runs the ATen-op kernel.

Example:
    >>> import torch
    >>> from timm_dropres.models import cpu_kernel
    >>> cpu_kernel.load()  # builds on the first call, or raises saying why it cannot
    >>> x, s = torch.ones(8), torch.full((8,), 2.0)
    >>> _ = cpu_kernel.drop_add(x, s, torch.tensor([1, 5]), 2.0, relu=False, out=x)  # drops at 1 and 5
    >>> x.tolist()
    [4.0, 2.0, 4.0, 4.0, 4.0, 2.0, 4.0, 4.0]
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

__all__ = ['SOURCE', 'available', 'load', 'build_error', 'build_directory', 'drop_scale', 'drop_add',
           'drop_add_relu_backward', 'geometric_positions_']

_logger = logging.getLogger(__name__)
_warned = False  # the failed build has been logged in this process

#: The C++ source compiled on first use.
SOURCE = Path(__file__).with_name('csrc') / 'dropout_cpu.cpp'
#: See the source's header for why each flag is there.
_CFLAGS = ('-O3', '-ffp-contract=off', '-fno-trapping-math')
#: With GCC, ``-fopenmp`` links ``libgomp.so.1``, which resolves to the copy torch's pip wheels load, so the loops
#: run on torch's thread pool. Another compiler would bring another OpenMP runtime: there the loops run serially.
_OPENMP = ('-fopenmp',)
#: Vector instructions by the CPU capability torch dispatches its own kernels to on this machine
#: (``torch.backends.cpu.get_cpu_capability()``); the capability is part of the build's name, so a cache
#: shared by machines of different kinds holds one build per kind. On the project's AVX-512 machine the
#: 512-bit build cut the kernels' extra time per resnet50 step by about 15 % against the baseline (SSE2)
#: build, and an AVX2 build was slower than the baseline, so AVX2 machines get the baseline build.
_ISA_FLAGS = {
    'AVX512': ('-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mprefer-vector-width=512'),
}


@functools.cache
def _cpp_extension():
    """``torch.utils.cpp_extension``, imported with its logger quiet: on CUDA wheels it logs a CUDA_HOME notice,
    which says nothing about this CPU build."""
    cpp_logger = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


@functools.cache
def _openmp() -> tuple[str, ...]:
    try:
        cpp_extension = _cpp_extension()
        return _OPENMP if cpp_extension.check_compiler_is_gcc(cpp_extension.get_cxx_compiler()) else ()
    except Exception:  # noqa: BLE001 - no compiler at all: the build will say so
        return ()


def _flags() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """``(compile flags, link flags, CPU capability)`` of the build on this machine."""
    capability = torch.backends.cpu.get_cpu_capability()
    return _CFLAGS + _openmp() + _ISA_FLAGS.get(capability, ()), _openmp(), capability


def _extension_name() -> str:
    cflags, ldflags, capability = _flags()
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), ' '.join(cflags + ldflags).encode(), torch.__version__.encode()):
        digest.update(part)
    return f'timm_dropres_cpu_{capability.lower()}_{digest.hexdigest()[:12]}'


def build_directory() -> Path:
    """Where the kernel is built and cached: ``$TORCH_EXTENSIONS_DIR`` (default, as torch's:
    ``$XDG_CACHE_HOME/torch_extensions``, ``~/.cache/torch_extensions`` without it) / the build's name."""
    cache = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or Path(cache) / 'torch_extensions'
    return Path(root) / _extension_name()


@functools.cache
def _build() -> str | None:
    """Build (or find in the cache) and load the library once per process; the reason it failed, or None."""
    try:
        cpp_extension = _cpp_extension()
        if not cpp_extension.is_ninja_available():
            return 'ninja is not on PATH (pip install ninja, in an activated environment)'
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        _logger.info('building (or loading from the cache) the fused CPU dropout kernel in %s', directory)
        cflags, ldflags, _ = _flags()
        cpp_extension.load(name=directory.name, sources=[str(SOURCE)], extra_cflags=list(cflags),
                           extra_ldflags=list(ldflags), build_directory=str(directory), is_python_module=False,
                           verbose=False)
    except Exception as err:  # noqa: BLE001 - a failed build means "use the ATen-op kernel", never a failed step
        return f'{type(err).__name__}: {err}'.strip()
    return None


def build_error() -> str | None:
    """Why the kernel cannot be used in this process (building it first if needed), or None when it can."""
    return _build()


def available() -> bool:
    """Whether the compiled kernel is loaded, building it on the first call; logs the reason once if not.

    Returns:
        True when ``drop_scale``, ``drop_add`` and ``drop_add_relu_backward`` can run.
    """
    global _warned
    error = _build()
    if error is not None and not _warned:
        _warned = True
        _logger.warning('the fused CPU dropout kernel could not be built, so its ATen-op version runs instead '
                        '(slower; set TIMM_DROPRES_DROPOUT_KERNEL=ops to skip the build): %s',
                        error.splitlines()[0][:500])
    return error is None


def load() -> None:
    """Build and load the kernel, or raise.

    Raises:
        RuntimeError: it cannot be built here; the message says why.
    """
    error = _build()
    if error is not None:
        raise RuntimeError(f'the fused CPU dropout kernel ("cpp") cannot be built: {error}')


def drop_scale(src: torch.Tensor, pos: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = src * scale`` with zeros at ``pos``, in one pass (``out`` may be ``src``).

    Args:
        src: dense CPU tensor.
        pos: strictly increasing int32 or int64 indices into ``src``'s memory.
        scale: the inverted-dropout scale.
        out: written; ``src``'s shape, dtype and strides; ``src`` itself or no memory in common with it.

    Returns:
        ``out``.
    """
    load()
    torch.ops.timm_dropres_cpu.drop_scale(src, pos, scale, out)
    return out


def drop_add(x: torch.Tensor, shortcut: torch.Tensor, pos: torch.Tensor, scale: float, relu: bool,
             out: torch.Tensor) -> torch.Tensor:
    """``out = act(shortcut + x * scale)``, ``act(shortcut)`` at ``pos``, ``act`` = ReLU when ``relu``.

    Args:
        x: the branch (dense CPU tensor).
        shortcut: ``x``'s shape, dtype and strides; must not share memory with ``out``.
        pos: strictly increasing int32 or int64 indices into ``x``'s memory.
        scale: the inverted-dropout scale.
        relu: apply ReLU to the sum.
        out: written; ``x``'s shape, dtype and strides; ``x`` itself or no memory in common with it.

    Returns:
        ``out``.
    """
    load()
    torch.ops.timm_dropres_cpu.drop_add(x, shortcut, pos, scale, relu, out)
    return out


def drop_add_relu_backward(grad: torch.Tensor, out: torch.Tensor, pos: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``drop_add`` with ``relu``: ``(grad_x, grad_shortcut)`` from the saved output.

    Args:
        grad: gradient of the output; ``out``'s shape, dtype and strides.
        out: the forward's output.
        pos: the forward's drops.
        scale: the forward's scale.

    Returns:
        ``grad_shortcut = threshold_backward(grad, out, 0)`` and ``grad_x = grad_shortcut * scale`` with zeros
        at ``pos``, both new tensors laid out as ``grad``.
    """
    grad_x, grad_shortcut = torch.empty_like(grad), torch.empty_like(grad)
    load()
    torch.ops.timm_dropres_cpu.drop_add_relu_backward(grad, out, pos, scale, grad_x, grad_shortcut)
    return grad_x, grad_shortcut


def geometric_positions_(words: torch.Tensor, inv_log: float, n: int, base: int) -> int:
    """Turn random words into drop positions in place: ``cpu_dropout.drop_positions``' op chain, bit for bit.

    Word ``i`` gives the uniform ``u = (w & 0xFFFFFF) * 2**-24``, the gap ``g = floor(log(1 - u) * inv_log) + 1``
    (the log by ``torch.log_``, the product and the ``+ 1`` rounded to float32) and the position
    ``base + g_0 + ... + g_i``.

    Args:
        words: contiguous 1-D int32 CPU tensor of random words; overwritten with the positions.
        inv_log: ``1 / log(1 - p)``, negative.
        n: positions from ``n`` on are not written.
        base: the position before the first (-1 to start at 0, else the last position of the previous words).

    Returns:
        How many positions lie below ``n`` (the first ones of ``words`` now); ``words.numel()`` when all do.

    Raises:
        RuntimeError: ``words`` is not a contiguous 1-D int32 CPU tensor, ``inv_log`` is not in ``[-6.45e7, 0)``
            (``p >= 1.6e-8``: every gap at most ``2**30 + 1``), ``n`` is not in ``[0, 2**31]`` (positions below it
            must fit int32), or ``base`` is not in ``[-1, n)``.
    """
    load()
    return torch.ops.timm_dropres_cpu.geometric_positions_(words, inv_log, n, base)
