"""Issue 21 batch C (family_blocks_c.py): FastViT, MobileViT, iFormer, LowFormer, EfficientViT (MIT), InceptionNeXt,
ConvMixer and LCNetV2. ``test_families.py`` runs one representative per block class for real (eval bit-identical,
train at rate 0 equal to the base, the audit); here, what is particular to these families."""
from __future__ import annotations

import pickle

import pytest
import timm
import torch
from timm.models import fastvit, lowformer, mobilevit
from timm.utils import reparameterize_model

import timm_dropres
from timm_dropres.models import families
from timm_dropres.models.dropres import SUFFIX
from timm_dropres.models.family_blocks_c import DropResIFormer
from timm_dropres.models.layers import HEAD_BEFORE_POOL, ResidualDropout
from timm_dropres.research.audit import audit

#: the smallest architecture of each model class of the batch
SMALLEST = ['fastvit_t8', 'fastvit_mci3', 'mobilevit_xxs', 'iformer_t', 'lowformer_b0', 'efficientvit_b0',
            'efficientvit_l1', 'inception_next_atto', 'convmixer_768_32', 'lcnetv2_small']


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.mark.parametrize('name', SMALLEST)
def test_convert_leaves_no_after_pool_dropout(name):
    """A base built with timm's drop_rate (after-pool dropout: F.dropout in forward_head, a head Dropout, or one
    inside the classifier) keeps none once converted: the audit of a train-mode pass (meta device) sees only
    ResidualDropout ops, every one ok, and one per residual block plus the head's."""
    model = timm.create_model(name, drop_rate=0.3, device='meta')
    timm_dropres.convert(model, res_drop_rate=0.1, drop_rate=0.2)
    report = audit(model)
    active = [e for e in report.entries if e.active]
    assert {e.op for e in active} == {'ResidualDropout'} and all(e.verdict == 'ok' for e in active)
    assert len(active) == len(list(timm_dropres.residual_blocks(model))) + 1
    head = families.head_dropout(model)
    assert head is not None and head.p == 0.2
    assert [e.location for e in active if e.name == timm_dropres.dropout_sites(model)[-1].name] == \
        ['head, before pooling']


def test_iformer_head_before_the_mean_survives_reset_and_pickle():
    model = timm.create_model('iformer_t' + SUFFIX, drop_rate=0.2, num_classes=4)
    assert type(model) is DropResIFormer
    assert isinstance(model.head_drop, ResidualDropout) and model.head_drop.where == HEAD_BEFORE_POOL
    assert isinstance(model.head.head_drop, torch.nn.Identity)  # RepVitClassifier's after-pool dropout
    model.reset_classifier(3)
    assert model.head_drop.p == 0.2 and model.head.head.l.out_features == 3
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is DropResIFormer and clone.head_drop.p == 0.2
    # the dropout acts on the map: with p close to 1 most positions of a channel are dropped before the mean,
    # so the pooled features vary from one draw to the next; pre_logits is the pooled vector
    model.head_drop.p = 0.5
    feats = torch.ones(2, model.num_features, 4, 4)
    model.train()
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features) and not torch.all(pooled == 1)
    model.eval()
    assert torch.equal(model.forward_head(feats, pre_logits=True), torch.ones(2, model.num_features))


def test_efficientvit_classifier_dropout_stays_off_after_reset():
    model = timm.create_model('efficientvit_b0', drop_rate=0.3, device='meta')
    timm_dropres.convert(model, drop_rate=0.1)
    assert isinstance(model.head.classifier[3], torch.nn.Identity)
    model.reset_classifier(7, global_pool='avg')
    assert families.head_dropout(model).p == 0.1 and isinstance(model.head.classifier[3], torch.nn.Identity)
    assert model.head.classifier[-1].out_features == 7


def test_which_branches_take_the_dropout():
    """FastViT: one per block, on its ConvMlp branch; LowFormer: BatchNorm branches only (not the GroupNorm1
    pre-normed attention and MLP); MobileViT: none inside the transformer part."""
    m = timm.create_model('fastvit_sa12' + SUFFIX, res_drop_rate=0.1, device='meta')
    blocks = [b for b in m.modules() if isinstance(b, (fastvit.RepMixerBlock, fastvit.AttentionBlock))]
    assert len(list(timm_dropres.residual_blocks(m))) == len(blocks) == 12
    assert all(isinstance(b.drop_path2 if isinstance(b, fastvit.AttentionBlock) else b.drop_path,
                          families.DropResMerge) for b in blocks)
    assert not any(isinstance(b.drop_path1, families.DropResMerge) for b in blocks
                   if isinstance(b, fastvit.AttentionBlock))
    m = timm.create_model('lowformer_b1' + SUFFIX, res_drop_rate=0.1, device='meta')
    residual = [b for b in m.modules() if isinstance(b, lowformer.ResidualBlock) and b.shortcut is not None]
    dropped = [b for b in residual if isinstance(b.drop_path, families.DropResMerge)]
    assert 0 < len(dropped) < len(residual)
    assert all(not any(isinstance(x, torch.nn.GroupNorm) for x in b.main.modules()) for b in dropped)
    assert all(any(isinstance(x, torch.nn.GroupNorm) for x in b.main.modules()) for b in residual if b not in dropped)
    m = timm.create_model('mobilevitv2_050' + SUFFIX, res_drop_rate=0.1, device='meta')
    for cls in (mobilevit.MobileVitBlock, mobilevit.MobileVitV2Block):
        for b in (b for b in m.modules() if isinstance(b, cls)):
            assert not any(isinstance(x, ResidualDropout) for x in b.modules())


def test_convmixer_features_only():
    """ConvMixer's features_only model is timm's FeatureGetterNet: its blocks are converted, it has no head."""
    m = timm.create_model('convmixer_768_32' + SUFFIX, features_only=True, out_indices=(31,), res_drop_rate=0.1,
                          device='meta')
    sites = timm_dropres.dropout_sites(m)
    assert len(sites) == 32 and all(s.where != HEAD_BEFORE_POOL for s in sites)


@pytest.mark.parametrize('name', ['fastvit_t8', 'lcnetv2_small'])
def test_reparameterized_twin_equals_reparameterized_base(name):
    """timm's reparameterize_model (deployment) folds the branches of the twin as of the base."""
    base = timm.create_model(name, num_classes=5).eval()
    ours = timm.create_model(name + SUFFIX, num_classes=5, res_drop_rate=0.1).eval()
    ours.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 64, 64)
    base, ours = reparameterize_model(base), reparameterize_model(ours)
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))


@pytest.mark.parametrize('name', ['nasnetalarge', 'pnasnet5large'])
def test_nas_cells_are_refused_with_the_reason(name):
    with pytest.raises(TypeError, match='does not support model type .*inside NAS cells'):
        timm_dropres.convert(timm.create_model(name, device='meta'))
    assert not timm.is_model(name + SUFFIX)
