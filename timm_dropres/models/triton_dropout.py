"""Residual dropout as Triton kernels that keep no mask, fused with the residual addition and ReLU.

``torch.native_dropout`` (what ``ResidualDropout`` ran on CUDA before) writes a 1-byte mask per element in
forward and reads it back in backward, and the residual addition and the final ReLU of a post-activation
block are two more passes over the block output. Here one forward kernel computes
``relu(shortcut + x * keep * scale)`` and one backward kernel regenerates ``keep`` from the Philox seed
saved in forward, so nothing per element is kept for backward (the ReLU's own saved output aside, which is
the next block's input and exists anyway).

The mask: element ``i`` (in the tensor's memory order) is kept when ``(r >> 1) >= threshold``, where ``r``
is output ``i % 4`` of Philox-4x32-10 at counter ``(i // 4, 0, 0, 0)`` under the 64-bit ``seed`` (Triton's
``tl.randint4x``). ``threshold = round(p * 2**31)``, so the realised rate is ``threshold / 2**31`` (within
``2**-32`` of ``p``) and the scale ``2**31 / (2**31 - threshold)`` makes ``E[y] = x`` for that rate. The seed
is drawn from torch's generator of the tensor's device (``torch.randint`` on the device, no host sync), so
``torch.manual_seed`` makes a run repeatable and ``torch.utils.checkpoint`` (which restores the RNG state)
replays the same mask.

This module imports Triton; ``layers`` imports it only when a kernel is about to run. Triton reads
``TRITON_INTERPRET`` when its functions are defined, so run a process with ``TRITON_INTERPRET=1`` from the
start to execute the kernels on CPU tensors (how the tests check them without a GPU).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
import triton
import triton.language as tl

__all__ = ['dropout_add', 'seeded_dropout_add', 'draw_seed', 'usable', 'keep_scale', 'rate_threshold',
           'supported_dtype', 'SUPPORTED_DTYPES']

#: Philox counters per program; each gives 4 uniforms, so a program covers ``4 * _BLOCK4`` elements.
_BLOCK4 = 256
_LEVELS = 1 << 31
#: dtypes the kernels load and store (math in float32).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rate_threshold(p: float) -> tuple[int, float]:
    """``(threshold, scale)`` for drop probability ``p``: drop when a 31-bit uniform is below ``threshold``.

    Args:
        p: drop probability in (0, 1).

    Returns:
        ``threshold`` in ``[1, 2**31 - 1]`` (realised rate ``threshold / 2**31``) and the inverted-dropout
        scale for that realised rate.

    Raises:
        ValueError: ``p`` is not in (0, 1).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f'p must be in (0, 1) for drawing drops, got {p!r}')
    threshold = min(max(int(round(p * _LEVELS)), 1), _LEVELS - 1)
    return threshold, _LEVELS / (_LEVELS - threshold)


def supported_dtype(dtype: torch.dtype) -> bool:
    return dtype in SUPPORTED_DTYPES


@triton.jit
def _keep(seed_ptr, rows, cols, threshold):
    """Keep flags of the ``[rows, 4]`` tile of elements ``4 * rows + cols`` (Philox counter = row)."""
    seed = tl.load(seed_ptr)
    r0, r1, r2, r3 = tl.randint4x(seed, rows)
    c = cols[None, :]
    r = tl.where(c == 0, r0[:, None], tl.where(c == 1, r1[:, None], tl.where(c == 2, r2[:, None], r3[:, None])))
    return (r >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _forward_kernel(x_ptr, s_ptr, out_ptr, seed_ptr, n, threshold, scale,
                    HAS_SHORTCUT: tl.constexpr, RELU: tl.constexpr, BLOCK4: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK4 + tl.arange(0, BLOCK4)
    cols = tl.arange(0, 4)
    offs = rows[:, None] * 4 + cols[None, :]
    inside = offs < n
    keep = _keep(seed_ptr, rows, cols, threshold)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    y = tl.where(keep, x * scale, 0.0)
    if HAS_SHORTCUT:
        y += tl.load(s_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # as torch.relu: NaN stays NaN (tl.maximum would give 0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _backward_kernel(g_ptr, out_ptr, gx_ptr, gs_ptr, seed_ptr, n, threshold, scale,
                     RELU: tl.constexpr, BLOCK4: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK4 + tl.arange(0, BLOCK4)
    cols = tl.arange(0, 4)
    offs = rows[:, None] * 4 + cols[None, :]
    inside = offs < n
    keep = _keep(seed_ptr, rows, cols, threshold)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if RELU:
        out = tl.load(out_ptr + offs, mask=inside, other=0.0)
        g = tl.where(out <= 0, 0.0, g)  # as threshold_backward: a NaN output passes its gradient
        tl.store(gs_ptr + offs, g.to(gs_ptr.dtype.element_ty), mask=inside)
    tl.store(gx_ptr + offs, tl.where(keep, g * scale, 0.0).to(gx_ptr.dtype.element_ty), mask=inside)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, 4 * _BLOCK4),)


def _on(t: torch.Tensor) -> ContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s (a tensor on another GPU would fault)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_forward(x: torch.Tensor, shortcut: Optional[torch.Tensor], out: torch.Tensor, seed: torch.Tensor,
                    p: float, relu: bool) -> torch.Tensor:
    """One forward launch: ``out = relu?(shortcut? + x * keep * scale)``, ``keep`` drawn from ``seed``; ``out``."""
    threshold, scale = rate_threshold(p)
    with _on(x):  # shortcut is a valid pointer either way; not read without HAS_SHORTCUT
        _forward_kernel[_grid(x.numel())](x, x if shortcut is None else shortcut, out, seed, x.numel(), threshold,
                                          scale, HAS_SHORTCUT=shortcut is not None, RELU=relu, BLOCK4=_BLOCK4)
    return out


def _launch_backward(grad: torch.Tensor, out: Optional[torch.Tensor], seed: torch.Tensor, p: float,
                     grad_x: torch.Tensor, grad_shortcut: Optional[torch.Tensor]) -> None:
    """One backward launch: ``grad_x = g' * keep * scale``, where ``g'`` is ``grad`` masked by the ReLU when the
    forward's ``out`` is given, and then also written to ``grad_shortcut``."""
    threshold, scale = rate_threshold(p)
    relu = out is not None
    with _on(grad):
        _backward_kernel[_grid(grad.numel())](grad, out if relu else grad, grad_x, grad_shortcut if relu else grad,
                                              seed, grad.numel(), threshold, scale, RELU=relu, BLOCK4=_BLOCK4)


def _laid_out(grad: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``grad`` with the forward input's strides (the mask follows that memory order), copied only if needed."""
    if grad.stride() == stride:
        return grad
    return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def keep_scale(seed: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The float32 tensor ``keep * scale`` that the kernels apply for ``seed``, laid out like ``like``.

    Regenerates the mask of a forward call from its seed: used by the backward when it must itself be
    differentiable (``create_graph=True``), and by tests.

    Args:
        seed: the 1-element int64 seed tensor of the call, on ``like``'s device.
        like: a dense tensor with the shape and strides of the call's input.
        p: the call's drop probability.

    Returns:
        float32 tensor with ``like``'s shape and strides: 0 where dropped, the scale where kept.
    """
    ones = torch.ones_like(like, dtype=torch.float32)
    return _launch_forward(ones, None, torch.empty_like(ones), seed, p, False)


class _DropoutAdd(torch.autograd.Function):
    """``relu?(shortcut? + x * keep * scale)`` with ``keep`` regenerated in backward from the saved seed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: Optional[torch.Tensor], p: float,  # type: ignore[override]
                relu: bool, inplace: bool = False) -> torch.Tensor:
        seed = draw_seed(x.device)
        if inplace:  # each element is read, then written, by the same program: safe in place
            out = x
            ctx.mark_dirty(x)
        else:
            out = torch.empty_like(x)  # x is dense: same strides, so flat indices match
        _launch_forward(x, shortcut, out, seed, p, relu)
        ctx.save_for_backward(seed, out if relu else None)
        ctx.p, ctx.relu, ctx.has_shortcut, ctx.stride = p, relu, shortcut is not None, x.stride()
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        seed, out = ctx.saved_tensors
        grad = _laid_out(grad, ctx.stride)
        if torch.is_grad_enabled():  # create_graph=True: the same map with differentiable torch ops
            if ctx.relu:
                grad = torch.ops.aten.threshold_backward(grad, out, 0)
            mask = keep_scale(seed, grad, ctx.p)
            return (grad * mask).to(grad.dtype), grad if ctx.has_shortcut else None, None, None, None
        gx = torch.empty_like(grad)
        gs = torch.empty_like(grad) if ctx.relu else grad
        _launch_backward(grad, out, seed, ctx.p, gx, gs if ctx.relu else None)
        return gx, gs if ctx.has_shortcut else None, None, None, None


def draw_seed(device: torch.device) -> torch.Tensor:
    """A 1-element int64 Philox seed from torch's generator of ``device`` (no host sync)."""
    return torch.randint(0, 1 << 62, (1,), device=device, dtype=torch.int64)


# ``torch.compile`` and ``torch.export`` cannot trace into a Triton launch made inside an autograd.Function
# that draws its own seed, so for them the same kernels are custom ops: the seed is drawn outside (an input,
# so a recomputed forward replays the mask) and the op is a pure function of its inputs. They never write in
# place (a custom op may not return an alias of its input), and only the seed and, with ReLU, the output are
# saved for backward.
@torch.library.custom_op('timm_dropres::seeded_dropout_add', mutates_args=())
def seeded_dropout_add(x: torch.Tensor, shortcut: Optional[torch.Tensor], seed: torch.Tensor, p: float,
                       relu: bool) -> torch.Tensor:
    """``relu?(shortcut? + x * keep * scale)`` with ``keep`` drawn from ``seed``: the custom op ``torch.compile``
    calls (``layers.residual_dropout_add`` under the forced ``triton`` kernel).

    Args:
        x: the branch, dense, of a supported dtype, on a device Triton runs on.
        shortcut: ``None``, or the tensor added to the dropped branch (``x``'s shape, dtype and strides).
        seed: a 1-element int64 tensor on ``x``'s device (``draw_seed``).
        p: drop probability in (0, 1).
        relu: apply ReLU to the sum.

    Returns:
        A new tensor with ``x``'s shape and strides.
    """
    return _launch_forward(x, shortcut, torch.empty_like(x), seed, p, relu)


@seeded_dropout_add.register_fake
def _(x, shortcut, seed, p, relu):
    return torch.empty_like(x)


@torch.library.custom_op('timm_dropres::seeded_dropout_backward', mutates_args=())
def _seeded_dropout_backward(grad: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    grad_x = torch.empty_like(grad)
    _launch_backward(grad, None, seed, p, grad_x, None)
    return grad_x


@_seeded_dropout_backward.register_fake
def _(grad, seed, p):
    return torch.empty_like(grad)


@torch.library.custom_op('timm_dropres::seeded_dropout_relu_backward', mutates_args=())
def _seeded_dropout_relu_backward(grad: torch.Tensor, out: torch.Tensor, seed: torch.Tensor,
                                  p: float) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_shortcut = torch.empty_like(grad), torch.empty_like(grad)
    _launch_backward(grad, out, seed, p, grad_x, grad_shortcut)
    return grad_x, grad_shortcut


@_seeded_dropout_relu_backward.register_fake
def _(grad, out, seed, p):
    return torch.empty_like(grad), torch.empty_like(grad)


def _seeded_setup_context(ctx, inputs, output) -> None:
    x, shortcut, seed, p, relu = inputs
    ctx.save_for_backward(seed, output if relu else None)
    ctx.p, ctx.relu, ctx.has_shortcut, ctx.stride = p, relu, shortcut is not None, x.stride()


def _seeded_backward(ctx, grad: torch.Tensor):
    seed, out = ctx.saved_tensors
    grad = _laid_out(grad, ctx.stride)
    if ctx.relu:
        grad_x, grad = _seeded_dropout_relu_backward(grad, out, seed, ctx.p)
    else:
        grad_x = _seeded_dropout_backward(grad, seed, ctx.p)
    return grad_x, grad if ctx.has_shortcut else None, None, None, None


seeded_dropout_add.register_autograd(_seeded_backward, setup_context=_seeded_setup_context)


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: the strides are those of some dimension order (size-1 dims ignored)."""
    step = 1
    dims = [(size, stride) for size, stride in zip(x.shape, x.stride(), strict=True) if size != 1]
    for size, stride in sorted(dims, key=lambda d: d[1]):
        if stride != step:
            return False
        step *= size
    return True


def dropout_add(x: torch.Tensor, shortcut: Optional[torch.Tensor], p: float, relu: bool = False,
                inplace: bool = False) -> torch.Tensor:
    """``relu(shortcut + dropout(x, p))`` (without the parts not asked for) in one Triton kernel each way.

    The caller checks ``usable(x, shortcut)`` first. Gradients: ``x`` gets ``keep * scale * g'`` and
    ``shortcut`` gets ``g'``, where ``g'`` is the incoming gradient masked by the ReLU when ``relu``.

    Args:
        x: the branch, a dense tensor of a supported dtype.
        shortcut: ``None``, or the tensor added to the dropped branch (same shape, dtype and strides).
        p: drop probability in (0, 1).
        relu: apply ReLU to the sum.
        inplace: write the result into ``x`` (marked dirty for autograd) instead of a new tensor.

    Returns:
        A tensor with ``x``'s shape and strides (``x`` itself when ``inplace``).
    """
    return _DropoutAdd.apply(x, shortcut, p, relu, inplace)


def usable(x: torch.Tensor, shortcut: Optional[torch.Tensor]) -> bool:
    """Whether the kernels can take ``x`` (and ``shortcut``): a supported dtype, dense, non-empty, and a
    shortcut of the same shape, dtype, device and strides."""
    if not supported_dtype(x.dtype) or x.numel() == 0 or not _dense(x):
        return False
    if shortcut is None:
        return True
    return (shortcut.shape == x.shape and shortcut.dtype == x.dtype and shortcut.device == x.device
            and shortcut.stride() == x.stride())
