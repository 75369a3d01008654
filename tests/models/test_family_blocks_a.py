"""Issue 21 batch A (family_blocks_a.py): the hybrid BatchNorm families that need another input size than
test_families.py's 64 px (attention biases sized for the input, or a 1x1 final map before a BatchNorm head), and
what is particular to them: one module dropping two or three branches, heads re-stated in ``forward_head``,
after-pool dropouts switched off, refusals.

The representatives that run at 64 px are in test_families.py's REPRESENTATIVES; the clients (FX, TorchScript,
torch.compile, torch.export, transformers) are in test_families_clients.py.
"""
from __future__ import annotations

import pickle

import pytest
import timm
import torch

import timm_dropres
from timm_dropres.models import families, family_blocks_a
from timm_dropres.models.dropres import SUFFIX
from timm_dropres.models.layers import HEAD_BEFORE_POOL, ResidualDropout
from timm_dropres.models.placement import SITE_LOCATIONS
from timm_dropres.research.audit import audit

#: (architecture, input size, create kwargs): one per block class / model class of batch A not in REPRESENTATIVES.
#: LeViT, EfficientViT-MSRA and SHViT put a BatchNorm after the mean pool, so their final map must be larger than
#: 1x1 (at 64 px it is 1x1 and that BatchNorm reads the dropped values: a hazard the audit reports).
SIZED = [
    # LevitBlock (two branches), LevitDownsample, LevitDistilled head
    ('levit_128s', 128, dict(img_size=128, drop_path_rate=0.1)),
    ('levit_conv_256d', 128, dict(img_size=128, drop_path_rate=0.1)),  # conv layout, non-distilled Levit head
    ('efficientvit_m0', 128, {}),  # no drop path; ResidualDrop units, NormLinear head after the pool
    ('shvit_s1', 128, {}),  # no drop path; Residual units (the GroupNorm attention unit gets none), NormLinear head
    # EfficientFormerV2Block (two branches), distilled head
    ('efficientformerv2_s0', 64, dict(img_size=64, drop_path_rate=0.1)),
    ('visformer_tiny', 64, dict(img_size=64, drop_path_rate=0.1)),  # BN pre-norm Block (two branches)
    # MetaBlock2d, LayerNorm MetaBlock1d, token head; its attention is sized for 224 px
    ('efficientformer_l1', 224, dict(drop_path_rate=0.1)),
]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _twin(name: str, num_classes: int = 7, **kwargs) -> torch.nn.Module:
    return timm.create_model(name + SUFFIX, num_classes=num_classes, **kwargs)


@pytest.mark.parametrize('name, size, kwargs', SIZED, ids=[s[0] for s in SIZED])
def test_sized_representative(name, size, kwargs):
    """As test_families.test_representative: strict loading, bit-identical eval output, train output at rate 0
    equal to the base's under one seed (drop path on where the family has one), and every dropout ok where
    placement.SITE_LOCATIONS says."""
    x = torch.randn(2, 3, size, size)
    base = timm.create_model(name, num_classes=7, drop_rate=0.0, **kwargs)
    ours = _twin(name, drop_rate=0.0, res_drop_rate=0.0, **kwargs)
    ours.load_state_dict(base.state_dict(), strict=True)
    base.load_state_dict(ours.state_dict(), strict=True)
    base.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
    base.train(), ours.train()
    with torch.no_grad():
        torch.manual_seed(3)
        want = base(x)
        torch.manual_seed(3)
        assert torch.equal(ours(x), want)
    timm_dropres.convert(ours, res_drop_rate=0.1, drop_rate=0.1)
    sites = timm_dropres.dropout_sites(ours)
    assert len(sites) == len(list(timm_dropres.residual_blocks(ours))) + 1 > 1
    report = audit(ours, input_size=(3, size, size))
    by_name = {}
    for e in report.entries:
        by_name.setdefault(e.name, []).append(e)
    for s in sites:
        assert by_name[s.name] and all(e.location in SITE_LOCATIONS[s.where] and e.verdict == 'ok'
                                       for e in by_name[s.name]), s
    # timm's own drop path on EfficientFormer's pooling mixer (`x + drop_path1(ls1(pool(x) - x))`: no weight layer,
    # so not a residual branch) reaches the MLP's BatchNorm: a hazard that is timm's, not the twin's
    own = [e for e in report.entries if e.op != 'ResidualDropout' and e.active and e.verdict != 'ok']
    assert not own or (name == 'efficientformer_l1' and {e.name.rsplit('.', 1)[-1] for e in own} == {'drop_path1'})


def test_levit_head_below_2x2_is_a_hazard_the_audit_reports():
    """At 64 px LeViT's final map is 1x1: the head BatchNorm after the pool reads the dropped values unaveraged.
    The placement does not hide it: the audit calls that head dropout a hazard (README: use such inputs with
    drop_rate=0)."""
    m = _twin('levit_128s', img_size=64, res_drop_rate=0.1, drop_rate=0.1)
    report = audit(m, input_size=(3, 64, 64))
    head = [e for e in report.entries if e.name == 'head_drop']
    assert [(e.location, e.verdict) for e in head] == [('head, 1x1 map', 'hazard')]
    assert all(e.verdict == 'ok' for e in report.entries if e.op == 'ResidualDropout' and e.name != 'head_drop')


@pytest.mark.parametrize('name, branches', [('levit_128s', 2), ('nextvit_small', 3), ('visformer_tiny', 2)])
def test_one_module_drops_each_bn_branch_of_a_block(name, branches):
    """Blocks with several BatchNorm branches hold one ``res_drop`` and call it once per branch (a fresh mask
    each time): the audit sees it run that many times, each time on a residual branch."""
    kwargs = dict(img_size=128) if name != 'nextvit_small' else {}
    m = _twin(name, res_drop_rate=0.1, **kwargs)
    block_name, block = next((n, b) for n, b in timm_dropres.residual_blocks(m)
                             if type(b) in family_blocks_a.BLOCK_TYPES.values()
                             and getattr(b, 'attn', getattr(b, 'e_mhsa', None)) is not None)
    report = audit(m, input_size=(3, 128, 128))
    runs = [e for e in report.entries if e.name == f'{block_name}.res_drop']
    assert len(runs) == branches and all(e.location == 'residual branch' and e.verdict == 'ok' for e in runs)
    assert type(block).__name__.startswith('DropRes')


def test_levit_after_pool_dropouts_off_and_kept_off_by_reset_classifier():
    model = timm.create_model('levit_128s', num_classes=5, drop_rate=0.3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    timm_dropres.convert(model, res_drop_rate=0.1, drop_rate=0.2)
    timm_dropres.convert(model, res_drop_rate=0.05, drop_rate=0.2)  # idempotent: rates replaced
    assert type(model) is family_blocks_a.DropResLevitDistilled and model.drop_rate == 0.0
    assert timm_dropres.dropout_args(model) == dict(drop_rate=0.2, res_drop_rate=0.05, res_drop_pos='after_last_bn')
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.head.drop, torch.nn.Identity) and isinstance(model.head_dist.drop, torch.nn.Identity)
    model.reset_classifier(3)
    assert families.head_dropout(model).p == 0.2 and model.head.linear.out_features == 3
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert not any(isinstance(m, torch.nn.Dropout) and not isinstance(m, ResidualDropout)
                   for m in (model.head.drop, model.head_dist.drop))
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded) is family_blocks_a.DropResLevitDistilled and loaded.head_drop.p == 0.2


@pytest.mark.parametrize('pool, location', [('token', 'head, before pooling'), ('avg', 'head, before pooling')])
def test_xcit_head_dropout_on_the_tokens_before_pooling(pool, location):
    """XCiT's head dropout replaces timm's after-pool ``head_drop`` and acts on the final token sequence. With
    ``global_pool='avg'`` it precedes a mean over the patch tokens; with the default ``'token'`` only the class
    token is kept, so its effect is that of dropout on the class token (no BatchNorm follows either way)."""
    m = _twin('xcit_nano_12_p16_224', global_pool=pool, res_drop_rate=0.1, drop_rate=0.1)
    assert isinstance(m.head_drop, ResidualDropout) and m.head_drop.where == HEAD_BEFORE_POOL
    report = audit(m, input_size=(3, 64, 64))
    head = [e for e in report.entries if e.name == 'head_drop']
    assert [(e.location, e.verdict) for e in head] == [(location, 'ok')]
    assert head[0].path == ('pool(16)' if pool == 'avg' else 'pool(17)')
    # only the LPI branch (the one with a BatchNorm) of each XCA block takes a residual dropout
    assert {s.name.rsplit('.', 2)[-2] for s in timm_dropres.dropout_sites(m)[:-1]} == {'drop_path3'}


@pytest.mark.parametrize('name', ['efficientvim_m1', 'efficientvim_m1_dist'])
def test_efficientvim_refused_with_the_reason(name):
    model = timm.create_model(name, device='meta')
    with pytest.raises(TypeError, match='does not support model type .*state-space hidden state'):
        timm_dropres.convert(model)
    assert not timm.is_model(name + SUFFIX)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:The tensor attributes')  # timm's LeViT caches attention biases in eval mode
def test_levit_compile_one_graph_and_export():
    """A re-stated block (one module, two branches) and a re-stated forward_head: Dynamo captures one graph with
    no break in train mode; torch.export drops with native_dropout in train mode and matches eager in eval."""
    x = torch.randn(2, 3, 64, 64)
    model = _twin('levit_128s', img_size=64, num_classes=5, res_drop_rate=0.2, drop_rate=0.2).train()
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    program = torch.export.export(model, (x,))
    assert any('native_dropout' in str(n.target) for n in program.graph.nodes if n.op == 'call_function')
    model.eval()
    assert torch.equal(torch.export.export(model, (x,)).module()(x), model(x))


def test_levit_transformers_loads_a_saved_folder(tmp_path):
    from transformers import AutoModelForImageClassification

    from timm_dropres.models.hf_folder import save_pretrained_folder

    model = _twin('levit_128s', num_classes=3, res_drop_rate=0.1).eval()  # img_size is not in config.json
    folder = save_pretrained_folder(model, tmp_path / 'm', label_names=['a', 'b', 'c'])
    hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    assert type(hf.timm_model) is family_blocks_a.DropResLevitDistilled
    assert timm_dropres.dropout_args(hf.timm_model) == timm_dropres.dropout_args(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize('name, kwargs', [('xcit_nano_12_p16_224', {}), ('levit_128s', dict(img_size=64))])
def test_features_only_through_timms_getter_wrapper(name, kwargs):
    """``features_only`` builds timm's FeatureGetterNet for these: its blocks get the residual dropout, no head
    dropout, and its eval features equal the base's."""
    f = _twin(name, features_only=True, res_drop_rate=0.1, **kwargs)
    base = timm.create_model(name, features_only=True, **kwargs)
    assert type(f).__name__ == 'FeatureGetterNet'
    sites = timm_dropres.dropout_sites(f)
    assert sites and all(s.where != HEAD_BEFORE_POOL for s in sites)
    assert len(sites) == len(list(timm_dropres.residual_blocks(f)))
    base.load_state_dict(f.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(f.eval()(x), base.eval()(x), strict=True))
