"""What users run, on twins of the other families: FX feature extraction, TorchScript, torch.compile (no graph
break), torch.export and transformers loading a saved folder.

Representatives of the three ways families.py places the residual dropout: composed with the drop path
(``mobilenetv3_small_050``, ``regnetx_002``), re-typed blocks (``dla46_c``, ``rexnet_100``: a forward of ours),
and torchvision's appended branch end (``convert`` only; torchvision models are not timm-registered).
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from timm.models import create_feature_extractor, get_graph_node_names

import timm_dropres
from timm_dropres.models.hf_folder import save_pretrained_folder

ARCHS = ['mobilenetv3_small_050', 'regnetx_002', 'dla46_c', 'rexnet_100',
         # issue 21: re-stated blocks and forward_heads: SwiftFormer (A), RepViT and CPUBone's re-typed
         # nn.AdaptiveAvgPool2d (B), LCNetV2 and iFormer's dropout before its mean (C). LeViT's compile, export
         # and transformers checks are in test_family_blocks_a.py
         'swiftformer_xs', 'repvit_m1', 'cpubone_s0', 'lcnetv2_small', 'iformer_t']
X = (2, 3, 64, 64)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _model(arch: str, mode: str) -> torch.nn.Module:
    model = timm.create_model(f'{arch}_dropres', num_classes=5, res_drop_rate=0.2, drop_rate=0.2)
    return model.train(mode == 'train')


def _seeded(fn, x):
    torch.manual_seed(7)
    return fn(x)


@pytest.mark.parametrize('arch', ARCHS)
def test_fx_feature_extraction(arch):
    x = torch.randn(X)
    for mode in ('train', 'eval'):
        model = _model(arch, mode)
        node = get_graph_node_names(model)[mode == 'eval'][-1]
        extractor = create_feature_extractor(model, return_nodes=[node]).train(mode == 'train')
        assert torch.equal(_seeded(extractor, x)[node], _seeded(model, x))  # train: same kernel, same draws


@pytest.mark.parametrize('arch', ARCHS)
def test_torchscript(arch):
    x = torch.randn(X)
    model = _model(arch, 'eval')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated in new torch
        scripted = torch.jit.script(model)
    assert torch.equal(scripted(x), model(x))
    scripted.train()
    assert not torch.equal(scripted(x), scripted(x))  # the dropout survives scripting


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['mobilenetv3_small_050', 'dla46_c',  # composed slot, re-stated block
                                  'fasternet_t0', 'iformer_t'])  # issue 21: a re-stated block (B), head (C)
def test_compile_one_graph_and_export(arch):
    """Dynamo captures one graph with no break (train mode, dropout active); torch.export drops with
    native_dropout in train mode and gives the eager output in eval mode."""
    x = torch.randn(X)
    model = _model(arch, 'train')
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    assert any('native_dropout' in t for t in targets)
    program.module()(x).sum().backward()
    model.eval()
    exported = torch.export.export(model, (x,)).module()
    assert torch.equal(exported(x), model(x))


def test_torchvision_compile_one_graph():
    model = timm_dropres.convert(torchvision.models.mobilenet_v3_small(num_classes=5), res_drop_rate=0.2,
                                 drop_rate=0.2).train()
    explain = torch._dynamo.explain(model)(torch.randn(X))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.mark.parametrize('arch', ['mobilenetv3_small_050', 'dla46_c', 'repvit_m1', 'iformer_t'])  # issue 21 B, C
def test_transformers_loads_a_saved_folder(arch, tmp_path):
    from transformers import AutoModelForImageClassification

    model = timm.create_model(f'{arch}_dropres', num_classes=3, res_drop_rate=0.1).eval()
    folder = save_pretrained_folder(model, tmp_path / 'm', label_names=['a', 'b', 'c'])
    hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    assert type(hf.timm_model).__name__ == type(model).__name__
    assert timm_dropres.dropout_args(hf.timm_model) == timm_dropres.dropout_args(model)
    x = torch.randn(X)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-6)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert loaded.pretrained_cfg['architecture'] == f'{arch}_dropres'
