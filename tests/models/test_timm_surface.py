"""timm's model API keeps working on dropres models."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_model_data_config

import timm_dropres


@pytest.mark.parametrize('arch', ['resnet18', 'resnetv2_18'])
def test_features_only(arch):
    ours = timm.create_model(f'{arch}_dropres', features_only=True, out_indices=(1, 2, 3, 4)).eval()
    base = timm.create_model(arch, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    base.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(ours(x), base(x), strict=True):
        assert torch.equal(a, b)
    assert ours.feature_info.channels() == base.feature_info.channels()
    assert sum(isinstance(m, timm_dropres.ResidualDropout) for m in ours.modules()) > 0


@pytest.mark.parametrize('arch', ['resnet18', 'resnetv2_18'])
def test_forward_features_head_intermediates(arch):
    model = timm.create_model(f'{arch}_dropres', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.num_features)
    assert torch.equal(model.forward_head(feats), model(x))
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 5 and torch.equal(final, feats)
    assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


def test_reset_classifier_keeps_head_dropout_before_pool():
    model = timm.create_model('resnet18_dropres', num_classes=10, drop_rate=0.3)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.head_drop.p == 0.3
    v2 = timm.create_model('resnetv2_18_dropres', num_classes=10, drop_rate=0.3)
    v2.reset_classifier(4)
    assert isinstance(v2.head.drop, torch.nn.Identity) and v2(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_grad_checkpointing_replays_dropout_masks():
    """torch.utils.checkpoint restores the RNG on recompute, so gradients match the plain run exactly."""
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('resnet18_dropres', num_classes=4, res_drop_rate=0.3).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        model(x).sum().backward()
        grads.append(model.conv1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_resolve_model_data_config_matches_base():
    with torch.device('meta'):  # only the configs are compared: no weights needed
        ours = resolve_model_data_config(timm.create_model('resnet50_dropres.a1_in1k'))
        base = resolve_model_data_config(timm.create_model('resnet50.a1_in1k'))
    assert ours == base


@pytest.mark.parametrize('arch', ['resnet18', 'resnetv2_18'])
def test_torchscript(arch):
    model = timm.create_model(f'{arch}_dropres', num_classes=10, res_drop_rate=0.2, drop_rate=0.2).eval()
    for m in model.modules():  # timm zero-inits the last BN of a block, which leaves nothing to drop after it
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(scripted(x), model(x))
    scripted.train()
    assert not torch.equal(scripted(x), scripted(x))  # dropout survives scripting


@pytest.mark.slow
def test_torch_compile_no_graph_breaks():
    """Dynamo captures the whole model (dropout included) in one graph, forward and backward.

    ``aot_eager`` exercises capture and autograd without inductor's C++ build, which takes minutes on 2 cores.
    """
    model = timm.create_model('resnet18_dropres', num_classes=10, res_drop_rate=0.2, drop_rate=0.2).train()
    x = torch.randn(2, 3, 32, 32)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(model, backend='aot_eager')
    compiled(x).sum().backward()
    assert model.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


def test_feature_cls_of_one_call_does_not_leak_into_the_next():
    """timm's builder updates feature_cfg in place; each call must get its own (fx, then the default hooks)."""
    timm.create_model('resnetv2_18_dropres', features_only=True, feature_cls='fx')
    feats = timm.create_model('resnetv2_18_dropres', features_only=True, out_indices=(1, 2))
    assert type(feats).__name__ == 'FeatureListNet' and len(feats(torch.randn(1, 3, 64, 64))) == 2
