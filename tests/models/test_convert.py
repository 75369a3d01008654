"""Invariants of the placement: bit-identical eval outputs, one dropout per block at the right spot."""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torchvision
from tracing import trace

import timm_dropres
from timm_dropres import AFTER_LAST_BN, BEFORE_LAST_CONV

# basic / bottleneck, post- / pre-activation, SE, ECA, grouped, anti-aliased, deep stem
REPRESENTATIVE = ['resnet18', 'resnet26d', 'seresnet18', 'seresnext26d_32x4d', 'ecaresnet26t', 'resnetaa50',
                  'resnetv2_18', 'resnetv2_50d']
POST_POSITIONS = [AFTER_LAST_BN, BEFORE_LAST_CONV]


def _pair(arch: str, **kwargs):
    ours = timm.create_model(f'{arch}_dropres', num_classes=10, **kwargs)
    base = timm.create_model(arch, num_classes=10)
    base.load_state_dict(ours.state_dict(), strict=True)
    return ours, base


@pytest.mark.parametrize('arch', REPRESENTATIVE)
@pytest.mark.parametrize('pos', POST_POSITIONS)
def test_eval_outputs_bit_identical(arch, pos):
    ours, base = _pair(arch, res_drop_rate=0.3, drop_rate=0.4, res_drop_pos=pos)
    for m in (ours, base):  # non-trivial BN statistics so the check is meaningful
        m.train()
        with torch.no_grad():
            m(torch.randn(4, 3, 64, 64))
        m.eval()
    base.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
        ours_cl = ours.to(memory_format=torch.channels_last)
        base_cl = base.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours_cl(x_cl), base_cl(x_cl))


@pytest.mark.parametrize('arch', ['resnet18', 'seresnext26d_32x4d', 'resnetv2_18'])
def test_train_mode_zero_rates_equal_base_under_same_seed(arch):
    ours, base = _pair(arch, res_drop_rate=0.0, drop_rate=0.0, drop_path_rate=0.1)
    base = timm.create_model(arch, num_classes=10, drop_path_rate=0.1)
    base.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = ours.train()(x)
    torch.manual_seed(1)
    b = base.train()(x)
    assert torch.equal(a, b)


def test_nonzero_rates_are_stochastic_and_eval_is_not():
    model = timm.create_model('resnet18_dropres', num_classes=10, res_drop_rate=0.2, drop_rate=0.2)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_head_dropout_acts_before_pooling():
    """After-pool dropout zeroes ~p of the pooled features; before-pool dropout averages dropped maps."""
    p = 0.5
    ours = timm.create_model('resnet18_dropres', num_classes=10, res_drop_rate=0.0, drop_rate=p).train()
    timm_style = timm.create_model('resnet18', num_classes=10, drop_rate=p).train()
    timm_style.load_state_dict(ours.state_dict())
    x = torch.randn(8, 3, 64, 64)  # 2x2 final map
    with torch.no_grad():
        feats = ours.forward_features(x)
        clean = feats.mean((2, 3))
        ours_pooled = ours.forward_head(feats, pre_logits=True)
        after_pool = timm_style.forward_head(feats, pre_logits=True)
    dense = (feats > 0).all(dim=(2, 3))  # channels active at all 4 positions
    assert dense.sum() > 100
    zero_frac_ours = (ours_pooled[dense] == 0).float().mean().item()
    zero_frac_after = (after_pool[dense] == 0).float().mean().item()
    assert zero_frac_after > 0.4  # timm's drop_rate zeroes whole pooled features: ~p
    assert zero_frac_ours < 0.15  # before the pool only all 4 positions dropped gives 0: p**4 = 0.06
    assert not torch.equal(ours_pooled, clean)
    # the module between the last block and the pool is the head dropout, on a 4-D map
    seen = []
    ours.head_drop.register_forward_hook(lambda m, a, o: seen.append(a[0].dim()) and None)
    ours(x)
    assert seen == [4]


def _expect_neighbours(events, name, before_prefixes, after):
    """What runs right before and after ``name`` on its own path (the shortcut's downsample is skipped)."""
    i = events.index(name)
    prev = events[i - 1]
    nxt = next(e for e in events[i + 1:] if '.downsample' not in e)
    assert any(prev.startswith(p) for p in before_prefixes), (name, prev)
    assert nxt == after or nxt.startswith(after), (name, nxt)


@pytest.mark.parametrize('arch,pos,last', [
    ('resnet18', AFTER_LAST_BN, 2), ('resnet18', BEFORE_LAST_CONV, 2),
    ('resnet26d', AFTER_LAST_BN, 3), ('resnet26d', BEFORE_LAST_CONV, 3),
    ('seresnext26d_32x4d', AFTER_LAST_BN, 3), ('seresnext26d_32x4d', BEFORE_LAST_CONV, 3),
])
def test_trace_post_activation(arch, pos, last):
    model = timm.create_model(f'{arch}_dropres', num_classes=10, res_drop_pos=pos, res_drop_rate=0.1).train()
    events = trace(model, torch.randn(2, 3, 64, 64))
    drops = [e for e in events if e.endswith('res_drop')]
    blocks = [n for n, _ in timm_dropres.residual_blocks(model)]
    assert drops == [f'{b}.res_drop' for b in blocks]  # exactly one per block, in order
    assert events.count('head_drop') == 1
    for b in blocks:
        if pos == AFTER_LAST_BN:
            _expect_neighbours(events, f'{b}.res_drop', [f'{b}.bn{last}', f'{b}.se.'], 'op:add')
        else:
            _expect_neighbours(events, f'{b}.res_drop', [f'{b}.aa', f'{b}.act{last - 1}'], f'{b}.conv{last}')
    _expect_neighbours(events, 'head_drop', [f'{blocks[-1]}.act{last}'], 'global_pool')
    assert 'F.dropout' not in ''.join(events)  # no after-pool functional dropout


@pytest.mark.parametrize('arch,last', [('resnetv2_18', 2), ('resnetv2_50d', 3)])
def test_trace_pre_activation(arch, last):
    model = timm.create_model(f'{arch}_dropres', num_classes=10, res_drop_rate=0.1).train()
    events = trace(model, torch.randn(2, 3, 64, 64))
    blocks = [n for n, _ in timm_dropres.residual_blocks(model)]
    assert [e for e in events if e.endswith('res_drop')] == [f'{b}.res_drop' for b in blocks]
    for b in blocks:
        _expect_neighbours(events, f'{b}.res_drop', [f'{b}.norm{last}'], f'{b}.conv{last}')
    _expect_neighbours(events, 'head_drop', ['norm'], 'head.global_pool')
    assert isinstance(model.head.drop, torch.nn.Identity)  # the ClassifierHead's after-pool dropout is gone
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == len(blocks) + 1


def test_preact_positions_coincide():
    a = timm.create_model('resnetv2_18_dropres', res_drop_pos='after_last_bn')
    b = timm.create_model('resnetv2_18_dropres', res_drop_pos='before_last_conv')
    assert {s.where for s in timm_dropres.dropout_sites(a)} == {s.where for s in timm_dropres.dropout_sites(b)}


def test_composes_with_drop_path_and_drop_block():
    model = timm.create_model('resnet50_dropres', num_classes=10, drop_path_rate=0.2, drop_block_rate=0.1,
                              res_drop_rate=0.1)
    events = trace(model.train(), torch.randn(2, 3, 64, 64))
    assert sum(e.endswith('res_drop') for e in events) == 16
    assert sum(e.endswith('drop_path') for e in events) == 15  # first block has rate 0 -> None
    assert any(e.endswith('drop_block') for e in events)
    blk = model.layer4[2]
    assert blk.drop_path is not None and blk.res_drop is not blk.drop_path


# the block types of resnet18, resnext50_32x4d and wide_resnet50_2, one block per stage (weights don't matter)
_TV = torchvision.models.resnet
@pytest.mark.parametrize('ctor', [
    functools.partial(_TV.ResNet, _TV.BasicBlock, [1, 1, 1, 1]),
    functools.partial(_TV.ResNet, _TV.Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4),
    functools.partial(_TV.ResNet, _TV.Bottleneck, [1, 1, 1, 1], width_per_group=128),
], ids=['basic', 'resnext', 'wide'])
@pytest.mark.parametrize('pos', POST_POSITIONS)
def test_convert_torchvision(ctor, pos):
    base = ctor(num_classes=10).eval()
    ours = timm_dropres.convert(copy.deepcopy(base), res_drop_rate=0.2, drop_rate=0.3, res_drop_pos=pos)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
    assert list(ours.state_dict()) == list(base.state_dict())
    events = trace(ours.train(), x)
    blocks = [n for n, _ in timm_dropres.residual_blocks(ours)]
    assert [e for e in events if e.endswith('res_drop')] == [f'{b}.res_drop' for b in blocks]
    _expect_neighbours(events, 'head_drop', [f'{blocks[-1]}.relu'], 'avgpool')
    last = 2 if ctor.args[0] is _TV.BasicBlock else 3
    for b in blocks:
        if pos == AFTER_LAST_BN:
            _expect_neighbours(events, f'{b}.res_drop', [f'{b}.bn{last}'], 'op:add')
        else:
            _expect_neighbours(events, f'{b}.res_drop', [f'{b}.relu'], f'{b}.conv{last}')


def test_convert_timm_model_is_in_place_idempotent_and_keeps_weights():
    base = timm.create_model('seresnext26d_32x4d', num_classes=10, drop_rate=0.3).eval()
    ref = copy.deepcopy(base)
    out = timm_dropres.convert(base, res_drop_rate=0.1, drop_rate=0.2)
    assert out is base
    again = timm_dropres.convert(base, res_drop_rate=0.25, drop_rate=0.05, res_drop_pos=BEFORE_LAST_CONV)
    sites = timm_dropres.dropout_sites(again)
    assert len(sites) == len(list(timm_dropres.residual_blocks(again))) + 1
    assert {(s.where, s.p) for s in sites} == {(BEFORE_LAST_CONV, 0.25), ('head_before_pool', 0.05)}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), ref(x))
    assert timm_dropres.dropout_args(again) == dict(drop_rate=0.05, res_drop_rate=0.25, res_drop_pos=BEFORE_LAST_CONV)


def test_convert_equals_registered_variant():
    torch.manual_seed(0)
    converted = timm_dropres.convert(timm.create_model('resnet26d', num_classes=5), res_drop_rate=0.2, drop_rate=0.1)
    torch.manual_seed(0)
    registered = timm.create_model('resnet26d_dropres', num_classes=5, res_drop_rate=0.2, drop_rate=0.1)
    assert str(converted) == str(registered)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    a = converted.train()(x)
    torch.manual_seed(3)
    b = registered.train()(x)
    assert torch.equal(a, b)


def test_convert_preserves_training_flag():
    model = timm.create_model('resnet18', num_classes=10).eval()
    timm_dropres.convert(model)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize('bad', [
    lambda: timm.create_model('vit_tiny_patch16_224', num_classes=10),
    lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)),
])
def test_convert_rejects_unsupported_models(bad):
    with pytest.raises(TypeError, match='does not support model type'):
        timm_dropres.convert(bad())


def test_convert_rejects_unknown_block_and_leaves_model_untouched():
    model = timm.create_model('resnet18', num_classes=10)
    model.layer3[1] = torch.nn.Identity()
    with pytest.raises(TypeError, match="block 'layer3.1' of type torch.nn.modules.linear.Identity"):
        timm_dropres.convert(model)
    assert type(model.layer1[0]).__name__ == 'BasicBlock' and not hasattr(model, 'head_drop')


def test_block_forwards_use_the_position_vocabulary():
    """The blocks compare with string literals (TorchScript cannot read module constants): they must be these."""
    import inspect

    from timm_dropres.models import blocks
    src = inspect.getsource(blocks)
    assert f"== '{AFTER_LAST_BN}'" in src and f"== '{BEFORE_LAST_CONV}'" in src
    assert set(__import__('re').findall(r"res_drop_pos == '(\w+)'", src)) == {AFTER_LAST_BN, BEFORE_LAST_CONV}


def test_block_norms_of_a_block_outside_the_resnet_family_is_a_type_error():
    """The hazard hooks ask a block for its norms: another family's block gets a TypeError naming the valid types."""
    from timm_dropres.models.blocks import block_norms

    block = timm.create_model('efficientnet_b0').blocks[1][0]
    with pytest.raises(TypeError, match=r"InvertedResidual is not a ResNet-family block; valid: \['BasicBlock'"):
        block_norms(block)
