"""Tracing paths (issue 10, item 1): torch.fx, timm's FX feature extraction, TorchScript, torch.export.

Every check runs on a post-activation (``resnet18_dropres``) and a pre-activation (``resnetv2_18_dropres``)
model, built 8 channels wide on 32 px inputs, in train and eval mode. Eval outputs must equal the eager
model's bit for bit; train-mode graphs must run the same kernel as eager (same seed, same output and
gradients) and backpropagate.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.models import create_feature_extractor

from timm_dropres.models.layers import ResidualDropout, residual_dropout, residual_dropout_add

ARCHS = {  # dropres arch -> (tiny kwargs, feature nodes for create_feature_extractor)
    'resnet18_dropres': (dict(channels=(8, 8, 8, 8), stem_width=8), ['layer1', 'layer4']),
    'resnetv2_18_dropres': (dict(channels=(8, 8, 8, 8), stem_chs=8), ['stages.0', 'stages.3']),
}
MODES = ['train', 'eval']


def tiny(arch: str, mode: str, **kwargs) -> torch.nn.Module:
    model = timm.create_model(arch, num_classes=5, res_drop_rate=0.2, drop_rate=0.2, **ARCHS[arch][0], **kwargs)
    return model.train(mode == 'train')


def seeded(fn, *args):
    torch.manual_seed(123)
    return fn(*args)


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('arch', ARCHS)
def test_symbolic_trace_matches_eager_forward_and_backward(arch, mode, x):
    model = tiny(arch, mode)
    graph = torch.fx.symbolic_trace(model)
    calls = [n for n in graph.graph.nodes
             if n.op == 'call_function' and n.target in (residual_dropout, residual_dropout_add)]
    assert len(calls) == sum(isinstance(m, ResidualDropout) for m in model.modules())  # one leaf call each
    # train mode with autograd: the post-activation blocks trace their fused dropout + add + ReLU as one call
    fused = sum(n.target is residual_dropout_add for n in calls)
    post_act = sum(isinstance(m, ResidualDropout) and m.where == 'after_last_bn' for m in model.modules())
    assert fused == (post_act if mode == 'train' else 0) and (post_act > 0) == (arch == 'resnet18_dropres')
    eager = seeded(model, x)
    traced = seeded(graph, x)
    assert torch.equal(traced, eager)  # eval: the base model's output; train: the same kernel, same draws
    eager.square().sum().backward()
    eager_grads = grads(model)
    model.zero_grad()
    traced.square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(grads(model), eager_grads, strict=True))
    if mode == 'train':
        assert not torch.equal(traced, seeded(model.eval(), x))  # it did drop


@pytest.mark.parametrize('arch', ARCHS)
def test_fx_graph_scripts(arch, x):
    for mode in MODES:
        model = tiny(arch, mode)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated in new torch
            scripted = torch.jit.script(torch.fx.symbolic_trace(model))
        out = scripted(x)
        if mode == 'eval':
            assert torch.equal(out, model(x))
        else:  # TorchScript takes native_dropout: it drops, and backpropagates
            assert not torch.equal(out, model.eval()(x))
            out.sum().backward()
            assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('arch', ARCHS)
def test_eager_model_scripts_and_backpropagates(arch, x):
    model = tiny(arch, 'train')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(model)
    scripted(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    scripted.eval()
    model.eval()
    assert torch.equal(scripted(x), model(x))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('arch', ARCHS)
def test_timm_fx_features_only(arch, mode, x):
    feats = tiny(arch, mode, features_only=True, feature_cls='fx')
    base = timm.create_model(arch.removesuffix('_dropres'), features_only=True, feature_cls='fx', **ARCHS[arch][0])
    base.load_state_dict(feats.state_dict())
    out = seeded(feats, x)
    assert len(out) == len(base.feature_info)
    if mode == 'eval':
        assert all(torch.equal(a, b) for a, b in zip(out, base.eval()(x), strict=True))
    else:
        sum(o.sum() for o in out).backward()
        assert all(p.grad is not None for p in feats.parameters())
        assert not all(torch.equal(a, b) for a, b in zip(out, seeded(feats.eval(), x), strict=True))


@pytest.mark.parametrize('arch', ARCHS)
def test_feature_settings_do_not_leak_between_calls(arch, x):
    """timm writes out_indices into, and pops flatten_sequential from, the feature_cfg it is given."""
    kwargs = ARCHS[arch][0]
    timm.create_model(arch, features_only=True, out_indices=(3, 4), **kwargs)
    timm.create_model(arch, features_only=True, feature_cls='fx', **kwargs)
    for cls in ('list', 'fx'):
        model = timm.create_model(arch, features_only=True, feature_cls=cls, **kwargs).eval()
        base = timm.create_model(arch.removesuffix('_dropres'), features_only=True, feature_cls=cls, **kwargs)
        assert model.feature_info.module_name() == base.feature_info.module_name()
        assert len(model(x)) == 5


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('arch', ARCHS)
def test_create_feature_extractor(arch, mode, x):
    model = tiny(arch, mode)
    nodes = ARCHS[arch][1]
    extractor = create_feature_extractor(model, return_nodes=nodes)
    captured = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: captured.__setitem__(n, o)) for n in nodes]
    seeded(model, x)
    for h in hooks:
        h.remove()
    out = seeded(extractor, x)
    assert list(out) == nodes
    assert all(torch.equal(out[n], captured[n]) for n in nodes)  # train too: same kernel, same draws
    if mode == 'train':
        out[nodes[-1]].sum().backward()
        assert next(model.parameters()).grad is not None  # the stem conv: upstream of everything
    extractor.train(mode != 'train')  # the extractor keeps one graph per mode and follows .train()/.eval()
    extractor(x)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ARCHS)
def test_torch_export(arch, x):
    """Train: the exported graph drops with native_dropout and backpropagates; eval: the eager output."""
    for mode in MODES:
        model = tiny(arch, mode)
        program = torch.export.export(model, (x,))
        targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
        exported = program.module()
        if mode == 'eval':
            assert not any('dropout' in t for t in targets)
            assert torch.equal(exported(x), model(x))
        else:
            assert any('native_dropout' in t for t in targets), sorted(targets)
            out = exported(x)
            out.sum().backward()
            assert all(p.grad is not None for p in exported.parameters())
            assert not torch.equal(out, model.eval()(x))


@pytest.mark.parametrize('arch', ARCHS)
def test_jit_trace_records_a_dropout_op_not_one_draw(arch, x):
    """torch.jit.trace in train mode takes native_dropout: a custom kernel's drops would be baked in."""
    model = tiny(arch, 'train')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # trace warns that train-mode outputs differ between runs
        traced = torch.jit.trace(model, (x,), check_trace=False)
    assert 'native_dropout' in str(traced.inlined_graph)
    assert not torch.equal(traced(x), traced(x))  # fresh drops every call
