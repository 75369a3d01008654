"""The Triton residual dropout (issue 22), checked without a GPU.

The kernels run under Triton's CPU interpreter. Triton reads ``TRITON_INTERPRET`` when it is imported, so
``test_kernels_under_the_triton_interpreter`` runs this file again in a fresh process with
``TRITON_INTERPRET=1``; there the ``kernel`` tests run on CPU tensors (on a CUDA machine, a plain run also
runs them on the GPU). The mask is checked against an independent NumPy Philox-4x32-10, so the tests know
which elements each call drops and compare the outputs and gradients with the formula and with the current
op (``_ApplyDrop``) at equal masks.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.checkpoint import checkpoint

from timm_dropres.models import cpu_dropout, layers

HAS_TRITON = importlib.util.find_spec('triton') is not None
INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
DEVICES = (['cpu'] if INTERPRETED else []) + (['cuda'] if torch.cuda.is_available() and not INTERPRETED else [])
kernel = pytest.mark.skipif(not HAS_TRITON or not DEVICES,
                            reason='needs Triton and a CUDA device, or TRITON_INTERPRET=1 (see the subprocess test)')
DEVICE = DEVICES[0] if DEVICES else 'cpu'


# ---------------------------------------------------------------------------------------------------------
# an independent reference of the mask: Philox-4x32-10 (Salmon et al., SC'11) in NumPy
# ---------------------------------------------------------------------------------------------------------

def philox4x32_10(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox-4x32-10 of four 32-bit counter words under a two-word key (Random123's ``philox4x32_R``)."""
    m = np.uint64(0xFFFFFFFF)
    c = [np.asarray(w, dtype=np.uint64) & m for w in counter]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = a * c[0], b * c[2]  # < 2**64: exact in uint64
        c = [((pb >> np.uint64(32)) ^ c[1] ^ k0) & m, pb & m, ((pa >> np.uint64(32)) ^ c[3] ^ k1) & m, pa & m]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m, (k1 + np.uint64(0xBB67AE85)) & m
    return c


def philox4x32(seed: int, counters: np.ndarray) -> list[np.ndarray]:
    """The four outputs at counters ``(c_lo, c_hi, 0, 0)`` under the 64-bit key ``seed`` (Triton's
    ``tl.randint4x(seed, c)``)."""
    counters = counters.astype(np.uint64)
    zero = np.zeros_like(counters)
    return philox4x32_10([counters, counters >> np.uint64(32), zero, zero], (seed & 0xFFFFFFFF, seed >> 32))


def reference_keep(seed: int, n: int, p: float) -> np.ndarray:
    """Keep flags of elements ``0..n-1`` (memory order): output ``i % 4`` of counter ``i // 4``, 31 bits."""
    threshold, _ = _rate_threshold(p)
    outs = philox4x32(seed, np.arange((n + 3) // 4, dtype=np.uint64))
    r = np.stack(outs, axis=1).reshape(-1)[:n]
    return (r >> np.uint64(1)) >= np.uint64(threshold)


def _rate_threshold(p: float) -> tuple[int, float]:
    t = min(max(round(p * 2 ** 31), 1), 2 ** 31 - 1)
    return t, 2 ** 31 / (2 ** 31 - t)


def in_memory_order(flat: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``like`` whose elements in ``like``'s memory order are ``flat``."""
    order = cpu_dropout._memory_order(like)
    t = torch.from_numpy(flat).view([like.shape[d] for d in order])
    return t.permute([order.index(d) for d in range(like.dim())])


def call(x, shortcut, p, relu):
    """The Function, with the seed it drew (read back by replaying the RNG)."""
    from timm_dropres.models import triton_dropout

    state = torch.random.get_rng_state() if x.device.type == 'cpu' else torch.cuda.get_rng_state(x.device)
    out = triton_dropout.dropout_add(x, shortcut, p, relu)
    if x.device.type == 'cpu':
        torch.random.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, x.device)
    seed = int(torch.randint(0, 1 << 62, (1,), device=x.device, dtype=torch.int64))
    return out, seed


# ---------------------------------------------------------------------------------------------------------
# without the kernels
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('counter,key,want', [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_matches_random123_known_answers(counter, key, want):
    """The known-answer vectors Random123 publishes for Philox-4x32-10 (kat_vectors)."""
    assert tuple(int(w) for w in philox4x32_10([np.uint64(c) for c in counter], key)) == want


@pytest.mark.parametrize('p', [1e-12, 0.05, 0.1, 0.5, 1 - 1e-12])
def test_rate_threshold_realised_rate_and_scale(p):
    if not HAS_TRITON:
        pytest.skip('needs Triton importable')
    from timm_dropres.models.triton_dropout import rate_threshold

    threshold, scale = rate_threshold(p)
    assert (threshold, scale) == _rate_threshold(p)
    rate = threshold / 2 ** 31
    assert 1 <= threshold <= 2 ** 31 - 1
    if 2 ** -31 < p < 1 - 2 ** -31:
        assert abs(rate - p) <= 2 ** -32
    else:  # clamped: at least one level dropped and one kept
        assert threshold in (1, 2 ** 31 - 1)
    assert scale * (1 - rate) == pytest.approx(1.0, abs=1e-15)  # E[y] = x at the realised rate
    with pytest.raises(ValueError, match=r'p must be in \(0, 1\) for drawing drops, got 0.0'):
        rate_threshold(0.0)


def test_automatic_choice_and_forcing():
    x = torch.randn(2, 4, 3, 3)
    assert layers.get_dropout_kernel() == 'auto'
    assert not layers._use_triton(x, x)  # CPU tensor: the CPU kernel
    for kernel in ('unfused', 'ops', 'cpp'):
        with layers.dropout_kernel(kernel):
            assert layers.get_dropout_kernel() == kernel and not layers._use_triton(x, x)
    assert layers.get_dropout_kernel() == 'auto'
    choices = r"\['auto', 'unfused', 'ops', 'cpp', 'triton'\]"
    with pytest.raises(ValueError, match=rf"dropout kernel must be one of {choices}, got 'cuda'"):
        layers.set_dropout_kernel('cuda')
    if not INTERPRETED:
        with layers.dropout_kernel('triton'), pytest.raises(RuntimeError, match='"triton" was forced but cannot run'):
            layers._use_triton(x, x)
        model = timm.create_model('test_resnet_dropres', num_classes=3, res_drop_rate=0.2).train()
        with layers.dropout_kernel('triton'), pytest.raises(RuntimeError, match='"triton" was forced but cannot run'):
            torch.compile(model, backend='aot_eager')(torch.randn(2, 3, 32, 32))  # the same check under compile


def test_bad_environment_variable_is_refused_at_import():
    env = dict(os.environ, TIMM_DROPRES_DROPOUT_KERNEL='fast')
    res = subprocess.run([sys.executable, '-c', 'import timm_dropres'], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert ("TIMM_DROPRES_DROPOUT_KERNEL must be one of ['auto', 'unfused', 'ops', 'cpp', 'triton'], got 'fast'"
            in res.stderr)


@pytest.mark.skipif(not HAS_TRITON, reason='needs Triton importable')
def test_usable_takes_dense_pairs_of_one_layout_and_dtype():
    from timm_dropres.models.triton_dropout import usable

    x = torch.randn(2, 4, 3, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert usable(x, None) and usable(x, x.clone()) and usable(cl, cl.clone())
    assert not usable(cl, x)                           # other strides: the separate ops
    assert not usable(x.transpose(2, 3)[..., :2], None)  # not dense
    assert not usable(x.double(), None) and not usable(x, x.half()) and not usable(x[:0], None)
    assert usable(x.transpose(0, 1), None)             # any dense order


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason='runs the interpreted tests itself')
@pytest.mark.skipif(not HAS_TRITON, reason='needs Triton importable')
def test_kernels_under_the_triton_interpreter():
    """This file's kernel tests, in a process that imports Triton with TRITON_INTERPRET=1 (CPU tensors)."""
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', __file__],
                         env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    summary = res.stdout.strip().splitlines()[-1]
    passed = re.search(r'(\d+) passed', summary)
    # every kernel test ran (only this launcher skips itself there)
    assert passed and int(passed.group(1)) >= 25 and 'failed' not in summary and '1 skipped' in summary, tail


# ---------------------------------------------------------------------------------------------------------
# the kernels (TRITON_INTERPRET=1 on CPU, or a CUDA device)
# ---------------------------------------------------------------------------------------------------------

FORMATS = [torch.contiguous_format, torch.channels_last]


@kernel
@pytest.mark.parametrize('fmt', FORMATS)
def test_mask_is_the_reference_philox_stream(fmt):
    from timm_dropres.models.triton_dropout import keep_scale

    like = torch.empty(2, 6, 5, 7, device=DEVICE).contiguous(memory_format=fmt)
    seed = 0x1234_5678_9ABC
    got = keep_scale(torch.tensor([seed], device=DEVICE), like, 0.3)
    assert got.stride() == like.stride()
    _, scale = _rate_threshold(0.3)
    want = in_memory_order(reference_keep(seed, like.numel(), 0.3), like).float() * np.float32(scale)
    assert torch.equal(got.cpu(), want)


@kernel
@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('with_shortcut', [False, True])
@pytest.mark.parametrize('fmt', FORMATS)
def test_forward_and_gradients_equal_the_formula_and_the_current_op(fmt, with_shortcut, relu):
    """Output and both gradients: the formula with the reference mask, and the current op (``_ApplyDrop``,
    the CPU kernel's Function) given that same mask, plus the addition and ReLU as separate ops."""
    p = 0.25
    x = torch.randn(3, 8, 5, 6, device=DEVICE).contiguous(memory_format=fmt).requires_grad_()
    s = torch.randn(3, 8, 5, 6, device=DEVICE).contiguous(memory_format=fmt).requires_grad_() if with_shortcut else None
    y, seed = call(x, s, p, relu)
    assert y.stride() == x.stride()
    keep = in_memory_order(reference_keep(seed, x.numel(), p), x).to(DEVICE)
    _, scale = _rate_threshold(p)

    def formula(x_, s_):
        out = x_ * keep * np.float32(scale)
        out = out + s_ if s_ is not None else out
        return out.relu() if relu else out

    def current(x_, s_):
        order = cpu_dropout._memory_order(x_)
        mask = keep.permute(order).contiguous().to(torch.uint8)
        out = cpu_dropout._ApplyDrop.apply(x_, mask, scale, order)
        out = out + s_ if s_ is not None else out
        return out.relu() if relu else out

    g = torch.randn_like(y).contiguous()  # another layout than y when channels_last: the kernel re-lays it
    got = torch.autograd.grad(y, [x] + ([s] if with_shortcut else []), g)
    for ref_fn in (formula, current):
        rx = x.detach().clone().requires_grad_()
        rs = s.detach().clone().requires_grad_() if with_shortcut else None
        ref = ref_fn(rx, rs)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        want = torch.autograd.grad(ref, [rx] + ([rs] if with_shortcut else []), g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@kernel
@pytest.mark.parametrize('create_graph', [False, True])
def test_relu_gradient_passes_nan_as_threshold_backward(create_graph):
    """NaN as torch.relu has it: a NaN sum stays NaN through the folded ReLU, and passes its gradient, as
    threshold_backward does, in the kernel and in the differentiable backward alike."""
    from timm_dropres.models.triton_dropout import dropout_add

    x = torch.randn(2, 8, 5, 5, device=DEVICE, requires_grad=True)
    s0 = torch.randn(2, 8, 5, 5, device=DEVICE)
    s0.view(-1)[::3] = float('nan')
    s = s0.requires_grad_()
    out = dropout_add(x, s, 0.25, relu=True)
    g = torch.randn_like(out)
    (grad_s,) = torch.autograd.grad(out, s, g, create_graph=create_graph)
    want = torch.ops.aten.threshold_backward(g, out.detach(), 0)
    assert torch.equal(out.isnan(), s0.isnan()) and torch.equal(grad_s.detach(), want)


@kernel
def test_in_place_equals_a_new_tensor():
    x0, s0 = torch.randn(2, 8, 6, 6, device=DEVICE), torch.randn(2, 8, 6, 6, device=DEVICE)
    runs = []
    for inplace in (False, True):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        branch = x * 1.0
        torch.manual_seed(8)
        out = layers._triton_dropout_add(branch, s, 0.2, True, inplace)
        assert (out.data_ptr() == branch.data_ptr()) == inplace
        out.square().sum().backward()
        runs.append((out.detach(), x.grad, s.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@kernel
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_rounds_once_from_float32(dtype):
    x = torch.randn(2, 16, 4, 4, device=DEVICE).to(dtype).requires_grad_()
    s = torch.randn(2, 16, 4, 4, device=DEVICE).to(dtype)
    y, seed = call(x, s, 0.1, True)
    keep = in_memory_order(reference_keep(seed, x.numel(), 0.1), x).to(DEVICE)
    _, scale = _rate_threshold(0.1)
    want = (x.detach().float() * keep * np.float32(scale) + s.float()).relu().to(dtype)
    assert y.dtype == dtype
    if INTERPRETED and dtype == torch.bfloat16:  # NumPy has no bfloat16: the interpreter's conversion may
        torch.testing.assert_close(y, want, rtol=2 ** -7, atol=0)  # land one unit in the last place away
    else:
        assert torch.equal(y, want)


@kernel
def test_realised_rate_and_unbiasedness():
    p = 0.1
    x = torch.ones(1 << 18, device=DEVICE)
    y, _ = call(x, None, p, False)
    threshold, scale = _rate_threshold(p)
    n = x.numel()
    assert abs((y == 0).double().mean().item() - threshold / 2 ** 31) < 5 * math.sqrt(p * (1 - p) / n)
    values = y.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(scale, rel=1e-7)
    assert abs(y.double().mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


@kernel
def test_seeded_runs_repeat_and_seeds_differ():
    x = torch.randn(4, 8, 8, 8, device=DEVICE)
    torch.manual_seed(11)
    a = layers._triton_dropout_add(x, x, 0.2, True)
    torch.manual_seed(11)
    b = layers._triton_dropout_add(x, x, 0.2, True)
    c = layers._triton_dropout_add(x, x, 0.2, True)
    assert torch.equal(a, b) and not torch.equal(a, c)


@kernel
@pytest.mark.parametrize('use_reentrant', [False, True])
def test_checkpoint_replays_the_mask(use_reentrant):
    """Gradient checkpointing reruns the forward in backward: the seed, hence the mask, must be the same."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(DEVICE)
    x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=True)

    def block(t):
        return layers._triton_dropout_add(conv(t), t, 0.3, True)

    torch.manual_seed(5)
    plain = block(x)
    plain.square().sum().backward()
    want = x.grad.clone(), conv.weight.grad.clone()
    x.grad, conv.weight.grad = None, None
    torch.manual_seed(5)
    ckpt = checkpoint(block, x, use_reentrant=use_reentrant)
    ckpt.square().sum().backward()
    assert torch.equal(ckpt, plain)
    assert torch.equal(x.grad, want[0]) and torch.equal(conv.weight.grad, want[1])


@kernel
def test_double_backward_regenerates_the_mask_with_torch_ops():
    """create_graph=True: the backward is itself differentiable; d(gx)/d(g) is keep * scale * relu'(out)."""
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    y, seed = call(x, s, 0.3, True)
    g = torch.randn_like(y, requires_grad=True)
    gx, gs = torch.autograd.grad(y, (x, s), g, create_graph=True)
    keep = in_memory_order(reference_keep(seed, x.numel(), 0.3), x).to(DEVICE)
    _, scale = _rate_threshold(0.3)
    live = (y > 0).float()
    torch.testing.assert_close(gx, g * live * keep * np.float32(scale))
    torch.testing.assert_close(gs, g * live)
    (dg,) = torch.autograd.grad(gx.sum(), g)
    torch.testing.assert_close(dg, live * keep * np.float32(scale))


def _saved_kinds(fn) -> list[tuple[torch.dtype, int]]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        fn()
    return saved


@kernel
def test_no_mask_is_kept_for_backward():
    x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=True)
    assert _saved_kinds(lambda: layers._triton_dropout_add(x, None, 0.1, False)) == [(torch.int64, 1)]  # the seed
    saved = _saved_kinds(lambda: layers._triton_dropout_add(x, x, 0.1, True))
    assert sorted(saved, key=lambda k: k[1]) == [(torch.int64, 1), (torch.float32, x.numel())]  # + ReLU's output


@kernel
@pytest.mark.parametrize('arch,post_act', [('test_resnet', True), ('resnetv2_18', False)])
def test_model_train_step_through_the_kernels(arch, post_act):
    """A whole train step with the Triton kernels forced: every residual dropout keeps a seed and no mask,
    the post-activation blocks call the fused op, gradients exist, and eval is untouched."""
    kwargs = dict(channels=(8, 8, 8, 8), stem_chs=8) if arch == 'resnetv2_18' else {}
    model = timm.create_model(f'{arch}_dropres', num_classes=5, res_drop_rate=0.2, drop_rate=0.2,
                              **kwargs).to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    calls = []
    real = layers._triton_dropout_add

    def spy(x_, s_, p_, relu_, inplace_=False):
        calls.append((s_ is not None, relu_))
        return real(x_, s_, p_, relu_, inplace_)

    layers._triton_dropout_add = spy
    try:
        with layers.dropout_kernel('triton'):
            saved = _saved_kinds(lambda: model(x).logsumexp(1).sum().backward())
    finally:
        layers._triton_dropout_add = real
    blocks = len([m for m in model.modules() if isinstance(m, layers.ResidualDropout)]) - 1
    assert len(calls) == blocks + 1  # every block's dropout and the head's
    assert sum(fused for fused, _ in calls) == (blocks if post_act else 0)
    assert all(relu for fused, relu in calls if fused)
    assert not any(dt in (torch.bool, torch.uint8, torch.int32) for dt, _ in saved)  # no mask, no positions
    assert sum(k == (torch.int64, 1) for k in saved) == blocks + 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad(), layers.dropout_kernel('triton'):
        out = model(x)
    with torch.no_grad(), layers.dropout_kernel('unfused'):
        assert torch.equal(out, model(x))


@kernel
def test_model_checkpointing_replays_masks():
    model = timm.create_model('test_resnet_dropres', num_classes=5, res_drop_rate=0.3).to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        torch.manual_seed(3)
        with layers.dropout_kernel('triton'):
            model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


# ---------------------------------------------------------------------------------------------------------
# torch.compile with the kernel forced to 'triton': the kernels as custom ops
# ---------------------------------------------------------------------------------------------------------

@kernel
@pytest.mark.parametrize('with_shortcut,relu', [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize('fmt', FORMATS)
def test_seeded_ops_pass_opcheck(fmt, with_shortcut, relu):
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration, and that the
    op runs the same under torch.compile's tracing."""
    from timm_dropres.models.triton_dropout import draw_seed, seeded_dropout_add

    x = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=fmt).requires_grad_()
    s = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=fmt).requires_grad_() if with_shortcut \
        else None
    torch.library.opcheck(seeded_dropout_add, (x, s, draw_seed(x.device), 0.3, relu))


@kernel
def test_seeded_op_is_the_eager_kernel_at_equal_seeds():
    from timm_dropres.models.triton_dropout import dropout_add, seeded_dropout_add

    x = torch.randn(2, 8, 5, 5, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 8, 5, 5, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 8, 5, 5, device=DEVICE)
    runs = []
    for op in (lambda: seeded_dropout_add(x, s, torch.randint(0, 1 << 62, (1,), device=DEVICE), 0.3, True),
               lambda: dropout_add(x, s, 0.3, True)):
        torch.manual_seed(8)  # both draw their seed with the same call
        out = op()
        runs.append((out.detach(), *torch.autograd.grad(out, (x, s), g)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@kernel
def test_compiled_model_calls_the_seeded_ops_in_one_graph():
    """Forced 'triton' under torch.compile: one graph, no break, the custom op where native_dropout was, and the
    compiled train step equals the eager one at the same seed (aot_eager: AOT autograd's forward and backward
    graphs, run by the eager kernels). Under 'auto' the graph keeps native_dropout for inductor to fuse."""
    model = timm.create_model('test_resnet_dropres', num_classes=3, res_drop_rate=0.2, drop_rate=0.1)
    model = model.to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    codes = []

    def capture(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    for kernel_name in ('triton', 'auto'):
        torch._dynamo.reset()
        with layers.dropout_kernel(kernel_name):
            torch.compile(model, backend=capture)(x)
    (forced, auto) = codes
    assert forced.count('timm_dropres.seeded_dropout_add') == 5 and 'native_dropout' not in forced  # 4 blocks + head
    assert 'seeded_dropout_add' not in auto and auto.count('torch.native_dropout(') == 5
    grads = []
    for compiled in (True, False):
        torch._dynamo.reset()
        model.zero_grad()
        torch.manual_seed(3)
        with layers.dropout_kernel('triton'):
            run = torch.compile(model, backend='aot_eager') if compiled else model
            out = run(x)
            out.square().sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
