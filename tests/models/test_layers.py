"""Argument validation and the dropout module itself."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

import timm_dropres
from timm_dropres.models import cpu_dropout, layers
from timm_dropres.models.cpu_dropout import _ApplyDrop, _memory_order
from timm_dropres.models.layers import (
    POSITION_KERNEL_MAX_P,
    ResidualDropout,
    check_position,
    check_rate,
    drop_positions,
    geometric_gaps,
    residual_dropout,
)


@pytest.mark.parametrize('bad', [-0.1, 1.0, 1.5, math.nan, '0.1', None, True])
def test_bad_rates_name_the_value(bad):
    with pytest.raises(ValueError, match=r'res_drop_rate must be') as e:
        check_rate('res_drop_rate', bad)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize('kwarg', ['drop_rate', 'res_drop_rate'])
@pytest.mark.parametrize('bad', [-0.5, 1.0])
def test_create_model_rejects_bad_rates(kwarg, bad):
    with pytest.raises(ValueError, match=rf'{kwarg} must be in \[0, 1\), got {bad}'):
        timm.create_model('resnet18_dropres', **{kwarg: bad})


def test_unknown_position_lists_choices():
    with pytest.raises(ValueError) as e:
        timm.create_model('resnet18_dropres', res_drop_pos='before_bn')
    msg = str(e.value)
    assert "'before_bn'" in msg and all(p in msg for p in timm_dropres.RES_DROP_POSITIONS)
    with pytest.raises(ValueError, match='res_drop_pos must be one of'):
        timm_dropres.convert(timm.create_model('resnet18'), res_drop_pos='after_add')
    assert check_position('auto') == 'auto'


def test_defaults_are_the_ones_the_readme_gives():
    model = timm.create_model('resnet18_dropres')
    assert timm_dropres.dropout_args(model) == dict(
        drop_rate=timm_dropres.DEFAULT_HEAD_DROP_RATE, res_drop_rate=timm_dropres.DEFAULT_RES_DROP_RATE,
        res_drop_pos=timm_dropres.DEFAULT_POST_ACT_POS)
    readme = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    res, head = timm_dropres.DEFAULT_RES_DROP_RATE, timm_dropres.DEFAULT_HEAD_DROP_RATE
    stated = f"`res_drop_rate={res}`, `drop_rate={head}`, `res_drop_pos='auto'`"
    assert stated in readme  # the Defaults section states what the code does
    # residual dropout is off by default (docs/results/transfer); the module is still in place, ready to be enabled
    assert all(b.res_drop.p == 0.0 for _, b in timm_dropres.residual_blocks(model))


def test_module_is_identity_in_eval_and_at_zero():
    x = torch.randn(4, 8, 5, 5)
    drop = ResidualDropout(0.5)
    assert drop.eval()(x) is x
    state = torch.get_rng_state()
    assert ResidualDropout(0.0).train()(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # p == 0 consumes no randomness
    y = drop.train()(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * 2)
    assert 0.35 < (~kept).float().mean() < 0.65
    assert isinstance(drop, torch.nn.Dropout) and 'where=after_last_bn' in repr(drop)


def test_channels_last_preserved():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y = ResidualDropout(0.3).train()(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


KERNEL_RATES = [0.05, 0.125, 0.3, 0.9]  # position kernel (p <= POSITION_KERNEL_MAX_P), then mask kernel


def realised_scale(p: float) -> float:
    """The scale each kernel applies: 1 / (1 - p) for positions, the 16-bit realised rate for the mask."""
    if p <= POSITION_KERNEL_MAX_P:
        return 1.0 / (1.0 - p)
    drop = round(p * 65536)
    return 65536 / (65536 - drop)


@pytest.mark.parametrize('p', KERNEL_RATES)
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_cpu_dropout_rate_scale_and_gradient(p, fmt):
    """The CPU kernels drop ~p (binomial 5 sigma), keep E[y] = x, and backprop through the same mask."""
    x = torch.ones(4, 64, 32, 32).contiguous(memory_format=fmt).requires_grad_()
    y = ResidualDropout(p).train()(x)
    n = y.numel()
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)
    assert y.is_contiguous(memory_format=fmt)
    assert torch.equal(y.unique(), torch.tensor([0.0, realised_scale(p)]))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask * scale = y for x == 1


@pytest.mark.parametrize('p', KERNEL_RATES)
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_kernel_matches_autograd_of_the_plain_formula(p, fmt):
    """Output and gradient equal, bit for bit, ``x * mask * scale`` differentiated by autograd."""
    x = torch.randn(3, 8, 7, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y = ResidualDropout(p).train()(x)
    mask = (y != 0).to(x.dtype)  # randn has no exact zeros
    ref_x = x.detach().clone().requires_grad_()
    ref = ref_x * mask * realised_scale(p)
    assert torch.equal(y, ref)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    ref.backward(upstream)
    assert torch.equal(x.grad, ref_x.grad)


@pytest.mark.parametrize('p', [0.05, 0.5])
def test_kernel_is_a_fixed_linear_map_with_double_backward(p):
    """With the drops fixed, the op is diagonal and linear: gradcheck and gradgradcheck pass."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    order = _memory_order(x)
    assert order == (0, 2, 3, 1)
    if p <= POSITION_KERNEL_MAX_P:
        drop = drop_positions(x.numel(), 0.3)
    else:
        drop = (torch.rand(2, 4, 5, 3) > p).to(torch.uint8)
    fn = lambda t: _ApplyDrop.apply(t, drop, 1.25, order)  # noqa: E731
    x.requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize('p', [0.01, 0.05, 0.1, POSITION_KERNEL_MAX_P])
def test_position_kernel_realised_rate_is_exact(p, one_torch_thread):
    """Exact, not sampled: push every float32 uniform ``uniforms`` (and torch.rand) can return through the kernel's
    inverse CDF. The mean gap E[G] over all 2**24 of them is the expectation for the code as it runs,
    and the long-run drop rate of the gap process is 1 / E[G]. It is within 1e-6 * p of p (well inside the
    1e-4 target), so E[y] / x = (1 - rate) / (1 - p) is 1 to within float32 epsilon (1.2e-7)."""
    u = cpu_dropout.uniforms(1 << 16)  # on the 2**-24 grid, as torch.rand, and using all 24 bits
    assert torch.equal(u * 2 ** 24 % 1, torch.zeros_like(u)) and 0 <= u.min() < 1e-3 and 1 - 1e-3 < u.max() < 1
    assert (u * 2 ** 24).long().bitwise_and(1).float().mean().sub(0.5).abs() < 0.01  # the lowest bit is used
    grid = torch.arange(2 ** 24, dtype=torch.float64).div_(2 ** 24).float()
    mean_gap = geometric_gaps(grid, p).double().mean().item()
    rate = 1.0 / mean_gap
    assert abs(rate - p) < 1e-6 * p
    assert abs((1 - rate) / (1 - p) - 1) < torch.finfo(torch.float32).eps


@pytest.mark.parametrize('draws', [None, 3])  # 3 gaps at a time: the draw-on loop runs every time
def test_position_kernel_covers_every_position_uniformly(draws):
    """Positions are sorted, in range, and each element is dropped at rate p (no edge effects)."""
    torch.manual_seed(3)
    counts = torch.zeros(64)
    for _ in range(4000):
        pos = drop_positions(64, 0.1, draws=draws)
        assert pos.numel() == 0 or (pos.diff() > 0).all() and 0 <= pos[0] and pos[-1] < 64
        counts[pos] += 1
    rate = counts / 4000
    assert (rate - 0.1).abs().max() < 5 * math.sqrt(0.1 * 0.9 / 4000)
    assert drop_positions(0, 0.1).numel() == 0


@pytest.mark.parametrize('kwargs,match', [
    (dict(n=10, p=0.0), r'p must be in \(0, 1\) for drawing drops, got 0.0'),
    (dict(n=10, p=1.0), r'got 1.0'),
    (dict(n=-1, p=0.1), r'n must be >= 0, got -1'),
    (dict(n=10, p=0.1, draws=0), r'draws must be >= 1 \(or None for the default\), got 0'),
])
def test_drop_positions_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        drop_positions(**kwargs)
    with pytest.raises(ValueError, match='p must be in'):
        geometric_gaps(torch.rand(3), 0.0)


def test_mask_kernel_rate_rounds_to_16_bits_and_p_near_one():
    x = torch.ones(1 << 18)
    y = ResidualDropout(0.3).train()(x)
    assert abs((y == 0).float().mean().item() - round(0.3 * 65536) / 65536) < 5 * math.sqrt(0.21 / x.numel())
    y = ResidualDropout(1 - 1e-7).train()(x)  # rounds to 65536 levels: clamped to 65535, no division by zero
    assert set(y.unique().tolist()) <= {0.0, 65536.0}


@pytest.mark.parametrize('p,max_bytes', [(0.05, 0.22), (0.1, 0.42), (0.3, 1.0)])
def test_saved_for_backward_is_small(p, max_bytes):
    """Only the positions (int32: 4 p bytes per element) or a uint8 mask (1 byte) are kept for backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(8, 32, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ResidualDropout(p).train()(x)
    assert len(saved) == 1
    assert saved[0].numel() * saved[0].element_size() <= max_bytes * x.numel()


def test_positions_saved_as_int32_unless_too_many(monkeypatch):
    """int32 positions while the largest possible one fits, int64 above; both give the same gradient."""
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    g = torch.randn_like(x)
    grads, dtypes = [], []
    for limit in (x.numel() - 1, x.numel() - 2):  # the largest position just fits / just does not
        monkeypatch.setattr(cpu_dropout, '_INT32_MAX', limit)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.append(t.dtype) or t, lambda t: t):
            torch.manual_seed(3)
            y = ResidualDropout(0.1).train()(x)
        grads.append(torch.autograd.grad(y, x, g)[0])
    assert dtypes == [torch.int32, torch.int64]
    assert torch.equal(grads[0], grads[1])


def test_cpu_dropout_other_layouts_and_seeding():
    for p in (0.1, 0.5):
        x = torch.randn(6, 8, 5, 5).transpose(0, 1)  # neither contiguous nor channels_last
        drop = ResidualDropout(p).train()
        y = drop(x)
        kept = y != 0
        assert kept.any() and (~kept).any() and y.stride() == x.stride()
        assert torch.allclose(y[kept], x[kept] * realised_scale(p))
        torch.manual_seed(7)
        a = drop(torch.ones(1000))
        torch.manual_seed(7)
        assert torch.equal(a, drop(torch.ones(1000)))
    assert ResidualDropout(0.1).train()(torch.tensor(3.0)).shape == ()


def test_eval_and_zero_rate_return_the_input_through_the_functional_op():
    x = torch.randn(2, 3)
    assert residual_dropout(x, 0.5, training=False) is x
    assert residual_dropout(x, 0.0, training=True) is x


def test_check_dropout_args_lists_every_bad_argument():
    with pytest.raises(ValueError) as e:
        timm.create_model('resnet18_dropres', drop_rate=1.2, res_drop_rate=-0.1, res_drop_pos='nowhere')
    msg = str(e.value)
    assert 'drop_rate must be in [0, 1), got 1.2' in msg and 'res_drop_rate must be in [0, 1), got -0.1' in msg
    assert "res_drop_pos must be one of" in msg and "'nowhere'" in msg
    from timm_dropres.models.layers import check_dropout_args
    assert check_dropout_args(None, 0, None) == (None, 0.0, None)


# ---------------------------------------------------------------------------------------------------------
# the residual addition fused with the CPU kernel (issue 22)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(params=['ops', 'cpp'])
def cpu_kernel_choice(request):
    """The fused CPU kernel made of ATen ops, and the compiled one (tests/models/test_cpu_kernel.py)."""
    with layers.dropout_kernel(request.param):
        yield request.param


@pytest.mark.parametrize('p', [0.05, 0.3])  # position kernel, mask kernel
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_cpu_dropout_add_equals_dropout_then_add_at_equal_masks(p, fmt, cpu_kernel_choice):
    """Same RNG state -> same drops as ``_cpu_dropout``; output and both gradients as the separate ops."""
    x = torch.randn(3, 8, 7, 5).contiguous(memory_format=fmt).requires_grad_()
    s = torch.randn(3, 8, 7, 5).contiguous(memory_format=fmt).requires_grad_()
    torch.manual_seed(9)
    fused = layers._cpu_dropout_add(x, s, p)
    rx, rs = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    torch.manual_seed(9)
    ref = layers._cpu_dropout(rx, p) + rs
    assert fused.stride() == x.stride()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    dropped = ref.detach() == rs.detach()
    assert torch.equal(fused.detach()[dropped], s.detach()[dropped])  # dropped: exactly the shortcut
    g = torch.randn_like(ref)
    fused.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, rx.grad) and torch.equal(s.grad, g)


@pytest.mark.parametrize('p', [0.05, 0.5])
def test_fused_cpu_op_is_a_fixed_linear_map_with_double_backward(p, cpu_kernel_choice):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    s = torch.randn_like(x)
    order = _memory_order(x)
    mask = (torch.rand(2, 4, 5, 3) > p).to(torch.uint8)
    drop = drop_positions(x.numel(), 0.3) if p <= POSITION_KERNEL_MAX_P else mask
    fn = lambda a, b: cpu_dropout._ApplyDropAdd.apply(a, b, drop, 1.25, order)  # noqa: E731
    args = (x.requires_grad_(), s.requires_grad_())
    assert torch.autograd.gradcheck(fn, args) and torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize('p', [0.05, 0.3])
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_fused_cpu_op_in_place_writes_into_the_branch(p, fmt, cpu_kernel_choice):
    """inplace=True (what the blocks pass, as their own ``x += shortcut``): the branch's memory holds the
    result, the values and gradients are those of the new-tensor op (which adds first and copies the
    shortcut back at the drops, where in place zeroes the branch there first), and a saved branch is caught."""
    x0 = torch.randn(2, 8, 5, 5)
    x0.view(-1)[::3] = float('inf')  # a dropped inf must leave exactly the shortcut in both variants
    x0, s0 = x0.contiguous(memory_format=fmt), torch.randn(2, 8, 5, 5).contiguous(memory_format=fmt)
    grads = []
    for inplace in (False, True):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        branch = x * 1.0  # a non-leaf, as a BN output
        torch.manual_seed(2)
        out = layers._cpu_dropout_add(branch, s, p, inplace=inplace)
        assert (out.data_ptr() == branch.data_ptr()) == inplace and out.stride() == x0.stride()
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), x.grad, s.grad))
    for a, b in zip(*grads, strict=True):  # the mask kernel's inf * 0 is NaN in both, as native_dropout's
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    if p <= POSITION_KERNEL_MAX_P:  # the position kernel leaves exactly the shortcut where it drops an inf
        kept = torch.isinf(grads[0][0])
        assert 0 < kept.sum() < x0.isinf().sum() and not grads[0][0].isnan().any()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    branch = x.sigmoid()  # sigmoid saves its output: writing into it must fail loudly in backward
    out = layers._cpu_dropout_add(branch, torch.randn(2, 8, 5, 5), p, inplace=True)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.sum().backward()
    y = torch.randn(2, 8, 5, 5)
    torch.manual_seed(2)
    same = layers._cpu_dropout_add(y, y, p, inplace=True)  # shortcut is the branch: not in place
    torch.manual_seed(2)
    assert same.data_ptr() != y.data_ptr() and torch.equal(same, layers._cpu_dropout_add(y, y.clone(), p))


def test_fused_cpu_op_saves_only_the_drops(cpu_kernel_choice):
    x = torch.randn(8, 32, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layers._cpu_dropout_add(x, torch.randn_like(x), 0.1)
    assert len(saved) == 1 and saved[0].dtype == torch.int32 and saved[0].numel() <= 0.12 * x.numel()


def test_residual_dropout_add_falls_back_to_separate_ops():
    x = torch.randn(2, 4, 3, 3)
    s = x.contiguous(memory_format=torch.channels_last)  # other strides: not fusable
    assert not layers._cpu_fusable(x, s) and layers._cpu_fusable(x, x.clone())
    torch.manual_seed(1)
    a = layers.residual_dropout_add(x, s, 0.2, True, True)
    torch.manual_seed(1)
    assert torch.equal(a, torch.relu(residual_dropout(x, 0.2) + s))
    assert torch.equal(layers.residual_dropout_add(x, s, 0.2, False, True), torch.relu(x + s))  # eval
    assert torch.equal(layers.residual_dropout_add(x, s, 0.0, True, False), x + s)


def test_fuse_with_add_only_in_train_mode_with_autograd():
    drop = ResidualDropout(0.1).train()
    assert layers.fuse_with_add(drop)
    with torch.no_grad():
        assert not layers.fuse_with_add(drop)  # the audit and module tests keep seeing the separate ops
    with layers.dropout_kernel('unfused'):
        assert not layers.fuse_with_add(drop)
    assert not layers.fuse_with_add(drop.eval()) and not layers.fuse_with_add(ResidualDropout(0.0).train())


@pytest.mark.parametrize('build', [
    lambda: timm.create_model('resnet18_dropres', num_classes=3, res_drop_rate=0.2, channels=(8, 8, 8, 8),
                              stem_width=8),
    lambda: timm.create_model('test_resnet_dropres', num_classes=3, res_drop_rate=0.2),
    lambda: timm_dropres.convert(
        __import__('torchvision').models.resnet50(num_classes=3, width_per_group=8), res_drop_rate=0.2),
], ids=['timm_basic', 'timm_test_resnet', 'torchvision_bottleneck'])
@pytest.mark.parametrize('fused', ['ops', 'auto'])
def test_fused_blocks_train_like_the_separate_ops(build, fused, one_torch_thread, monkeypatch):
    """A train step with the fused dropout + addition (+ ReLU) equals the unfused blocks at the same seed,
    up to the rounding of the fused addition (at rate 0.2 the uint8 mask kernel runs, in ATen ops under every
    choice; the compiled kernel's bit-for-bit equality at the position kernel's rates is test_cpu_kernel.py's);
    eval outputs are bit-identical and never fuse."""
    model = build().train()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = layers._cpu_dropout_add
    monkeypatch.setattr(layers, '_cpu_dropout_add', lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for kernel in (fused, 'unfused'):
        model.zero_grad()
        torch.manual_seed(4)
        with layers.dropout_kernel(kernel):
            out = model(x)
            out.square().sum().backward()
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        blocks = len(list(timm_dropres.residual_blocks(model)))
        assert len(calls) == blocks  # every block fused, none more with 'unfused'
    (out_a, grads_a), (out_b, grads_b) = runs
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    model.eval()
    with torch.no_grad():
        base = model(x)
        with layers.dropout_kernel('unfused'):
            assert torch.equal(base, model(x))


def test_fused_blocks_replay_under_gradient_checkpointing(one_torch_thread):
    model = timm.create_model('test_resnet_dropres', num_classes=3, res_drop_rate=0.3).train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        torch.manual_seed(6)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
