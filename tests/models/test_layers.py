"""Argument validation and the dropout module itself."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

import timm_dropres
from timm_dropres.models.layers import ResidualDropout, check_position, check_rate


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


@pytest.mark.parametrize('p', [0.05, 0.1, 0.3, 0.9])
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_cpu_dropout_rate_scale_and_gradient(p, fmt):
    """The CPU fast path drops ~p (binomial 5 sigma), keeps E[y] = x, and backprops through the same mask."""
    x = torch.ones(4, 64, 32, 32).contiguous(memory_format=fmt).requires_grad_()
    y = ResidualDropout(p).train()(x)
    n = y.numel()
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)
    assert y.is_contiguous(memory_format=fmt)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask * scale = y for x == 1


def test_cpu_dropout_other_layouts_and_seeding():
    x = torch.randn(6, 8, 5, 5).transpose(0, 1)  # neither contiguous nor channels_last
    drop = ResidualDropout(0.5).train()
    assert (drop(x) == 0).any()
    torch.manual_seed(7)
    a = drop(torch.ones(1000))
    torch.manual_seed(7)
    assert torch.equal(a, drop(torch.ones(1000)))


def test_check_dropout_args_lists_every_bad_argument():
    with pytest.raises(ValueError) as e:
        timm.create_model('resnet18_dropres', drop_rate=1.2, res_drop_rate=-0.1, res_drop_pos='nowhere')
    msg = str(e.value)
    assert 'drop_rate must be in [0, 1), got 1.2' in msg and 'res_drop_rate must be in [0, 1), got -0.1' in msg
    assert "res_drop_pos must be one of" in msg and "'nowhere'" in msg
    from timm_dropres.models.layers import check_dropout_args
    assert check_dropout_args(None, 0, None) == (None, 0.0, None)
