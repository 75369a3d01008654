"""The other BatchNorm residual families (families.py): registry, invariants on representatives, refusals.

Every twin is also checked on the meta device by ``python -m timm_dropres.research.coverage`` (state dict, strict
loading, the audit of a train-mode pass); ``test_coverage.py`` checks that its committed result is current. Here,
one representative per block class runs for real on the CPU (64 px inputs, one thread).
"""
from __future__ import annotations

import fnmatch
import pickle

import pytest
import timm
import torch
import torchvision

import timm_dropres
from timm_dropres.models import families
from timm_dropres.models.dropres import FAMILY_MODULES, FAMILY_SKIPPED, SUFFIX, family_variants, skip_reason
from timm_dropres.models.layers import HEAD_BEFORE_POOL, ResidualDropout
from timm_dropres.models.placement import SITE_LOCATIONS
from timm_dropres.research.audit import audit

#: the issue's "done when" list
NAMED = ['efficientnet_b0', 'mobilenetv3_large_100', 'regnety_032', 'resnest50d', 'dla34', 'cspresnet50',
         'res2net50_26w_4s', 'hrnet_w18', 'repvgg_a2']

#: one architecture per block class / model class (the block classes they exercise in the comment)
REPRESENTATIVES = [
    'efficientnet_b0',            # EfficientNet: DepthwiseSeparableConv, InvertedResidual
    'mobilenetv3_small_050',      # MobileNetV3 head (pool -> conv_head)
    'mobilenetv4_conv_small_035',  # UniversalInvertedResidual
    'tf_efficientnetv2_b0',       # EdgeResidual
    'regnety_002',                # regnet Bottleneck (SE)
    'repvgg_a0',                  # byobnet RepVggBlock
    'mobileone_s0',               # byobnet MobileOneBlock
    'gernet_s',                   # byobnet BasicBlock, BottleneckBlock
    'darknet17',                  # cspnet DarkBlock
    'cs3darknet_focus_s',         # cspnet BottleneckBlock
    'cspnext_tiny',               # CspNextBlock
    'dla46_c',                    # DlaBottleneck, DlaRoot
    'hrnet_w18_small',            # resnet.py blocks inside HRNet
    'res2net50_26w_4s',           # Bottle2neck in timm's ResNet class
    'resnest14d',                 # ResNestBottleneck (re-stated forward)
    'skresnet18',                 # SelectiveKernelBasic
    'rexnet_100',                 # LinearBottleneck (widened channels)
    'ghostnet_050',               # GhostBottleneck
    'repghostnet_050',            # RepGhostBottleneck
    'hgnetv2_b0',                 # HighPerfGpuBlock
    'ese_vovnet39b',              # OsaBlock with residual
    # issue 21 batch A (the ones that need another input size: test_family_blocks_a.py)
    'xcit_nano_12_p16_224',       # XCABlock (LPI branch slot), LayerNorm ClassAttentionBlock, Xcit head
    'tiny_vit_5m_224',            # tiny_vit MBConv, LayerNorm TinyVitBlock
    'swiftformer_xs',             # SwiftFormer ConvEncoder, LocalRepresentation, Block (re-stated), head
    'nextvit_small',              # NextConvBlock, NextTransformerBlock (re-stated, one module, 2-3 branches)
    # issue 21 batch B
    'legacy_seresnet18',          # senet SEResNetBlock (re-stated: after the SE gate)
    'legacy_seresnext26_32x4d',   # senet SEResNeXtBottleneck (forward shared with SEBottleneck, SEResNetBottleneck)
    'cpubone_s0',                 # cpubone ResidualBlock (BN ones only), head pool nn.AdaptiveAvgPool2d
    'repvit_m1',                  # RepViTBlock, RepVitDownsample, legacy RepVggDw; mean-pool head (DropResRepVit)
    'dpn48b',                     # DualPathBlock, separate residual conv (b)
    'dpn68',                      # DualPathBlock, residual part sliced from the shared conv
    'starnet_s050',               # starnet Block (appended to g, before dwconv2)
    'fasternet_t0',               # fasternet MLPBlock (re-stated: before the last conv)
    'xception41',                 # XceptionModule (drop path slot)
    'xception41p',                # PreXceptionModule (re-stated: after the last BN + act)
    'legacy_xception',            # xception Block (appended to rep)
    'inception_resnet_v2',        # Block35, Block17, Block8 (re-stated: before the 1x1 conv)
    # issue 21 batch C
    'fastvit_sa12',               # fastvit RepMixerBlock, AttentionBlock (drop_path2)
    'mobilevit_xxs',              # ByobNet with vision_transformer.Block (no dropout)
    'mobilevitv2_050',            # ByobNet with LinearTransformerBlock (no dropout)
    'iformer_t',                  # iformer Residual; DropResIFormer head (no pool module)
    'lowformer_b0',               # lowformer ResidualBlock (GroupNorm1 branches get none)
    'efficientvit_b0',            # EfficientViT ResidualBlock (re-stated), classifier dropout switched off
    'efficientvit_l1',            # EfficientVitLarge
    'inception_next_atto',        # MetaNeXtBlock
    'convmixer_768_32',           # convmixer Residual (appended to fn)
    'lcnetv2_small',              # RepDepthwiseSeparable (re-stated)
]
# issue 21 batch C: MobileViT is a ByobNet, whose drop path runs in blocks without a shortcut too (timm's hazard)
TIMM_DROP_PATH_HAZARDS = ['mobilevit_xxs', 'mobilevitv2_050']
X = (2, 3, 64, 64)
#: representatives whose unpadded convolutions and pools need a larger input (issue 21 batch B)
X_LARGER = {'inception_resnet_v2': (2, 3, 112, 112)}  # below, a max pool collapses a 3x3 map


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_named_architectures_registered_with_mirrored_tags():
    listed = set(timm.list_models('*_dropres'))
    assert all(n + SUFFIX in listed for n in NAMED)
    assert set(family_variants()) <= listed and len(family_variants()) > 300
    for tagged in ('efficientnet_b0.ra_in1k', 'mobilenetv3_large_100.ra_in1k', 'regnety_032.ra_in1k',
                   'resnest50d.in1k', 'repvgg_a2.rvgg_in1k'):
        arch, tag = tagged.split('.')
        ours, base = timm.get_pretrained_cfg(f'{arch}{SUFFIX}.{tag}'), timm.get_pretrained_cfg(tagged)
        assert ours.hf_hub_id == base.hf_hub_id and ours.input_size == base.input_size
        assert ours.architecture == arch + SUFFIX


def _pair(name: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The base and its twin (rates 0) with the base's weights; drop path on where the family has one."""
    # ResNeSt and RexNet: the twin's drop path acts on the branch only (test_timm_drop_path_fixes_...)
    extra = dict(drop_path_rate=0.1) if name not in ('resnest14d', 'rexnet_100') else {}
    try:
        base = timm.create_model(name, num_classes=7, drop_rate=0.0, **extra)
    except TypeError:  # DLA, GhostNet: no stochastic depth
        extra = {}
        base = timm.create_model(name, num_classes=7, drop_rate=0.0)
    ours = timm.create_model(name + SUFFIX, num_classes=7, **extra, **kwargs)
    ours.load_state_dict(base.state_dict(), strict=True)
    return base, ours


@pytest.mark.parametrize('name', REPRESENTATIVES)
def test_representative(name):
    """Strict loading, bit-identical eval output, train mode at rate 0 equal to the base (same seed, drop path
    on: it keeps its rate and RNG draws), and the audit of a train-mode pass at rate 0.1: every dropout ok and
    where placement.SITE_LOCATIONS says."""
    size = X_LARGER.get(name, X)
    x = torch.randn(size)
    base, ours = _pair(name, drop_rate=0.0, res_drop_rate=0.0)
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
    report = audit(ours, input_size=size[1:])
    entries = {e.name: e for e in report.entries}
    for s in sites:
        assert entries[s.name].location in SITE_LOCATIONS[s.where] and entries[s.name].verdict == 'ok', s
    # timm's own drop path runs in VoVNet's blocks without a residual too (a hazard that is timm's, not ours)
    own = [e for e in report.entries if e.op != 'ResidualDropout' and e.active and e.verdict != 'ok']
    assert not own or (name in ('ese_vovnet39b', *TIMM_DROP_PATH_HAZARDS) and {e.op for e in own} == {'DropPath'})


def test_convert_is_idempotent_keeps_weights_and_reset_classifier_keeps_head_dropout():
    model = timm.create_model('efficientnet_b0', num_classes=5, drop_rate=0.3, drop_path_rate=0.1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    timm_dropres.convert(model, res_drop_rate=0.1, drop_rate=0.2)
    timm_dropres.convert(model, res_drop_rate=0.05, drop_rate=0.2)
    assert type(model).__name__ == 'DropResEfficientNet' and model.drop_rate == 0.0  # no after-pool dropout
    assert timm_dropres.dropout_args(model) == dict(drop_rate=0.2, res_drop_rate=0.05, res_drop_pos='after_last_bn')
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    merge = model.blocks[1][1].drop_path
    assert isinstance(merge, families.DropResMerge) and merge.drop_path.drop_prob > 0  # drop path kept
    model.reset_classifier(3)
    assert families.head_dropout(model).p == 0.2 and model.classifier.out_features == 3
    assert pickle.loads(pickle.dumps(model)).global_pool.head_drop.p == 0.2
    model.eval().reset_classifier(4)  # timm rebuilds the pool: its fresh head dropout takes the model's mode
    assert not families.head_dropout(model).training


def test_pruned_pre_activation_xception_matches_its_base():
    # timm's prune_to_tap swaps the last separable conv for an Identity; the re-stated block must follow it
    torch.manual_seed(0)
    base = timm.create_model('xception41p').eval()
    twin = timm.create_model('xception41p_dropres', res_drop_rate=0.1).eval()
    twin.load_state_dict(base.state_dict())
    for m in (base, twin):
        m.prune_intermediate_layers(indices=[1])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(base(x), twin(x))


def test_entrypoint_refuses_bad_arguments_before_building():
    with pytest.raises(ValueError, match="res_drop_pos must be one of \\['auto', 'after_last_bn'\\]"):
        timm.create_model('efficientnet_b0_dropres', res_drop_pos='before_last_conv')
    with pytest.raises(ValueError, match='res_drop_rate must be in'):
        timm.create_model('regnety_002_dropres', res_drop_rate=1.5)


def test_features_only_and_local_head_positions():
    f = timm.create_model('efficientnet_b0_dropres', features_only=True, res_drop_rate=0.1)
    assert all(s.where != HEAD_BEFORE_POOL for s in timm_dropres.dropout_sites(f))
    assert len(timm_dropres.dropout_sites(f)) == 9
    m = timm.create_model('rexnet_100_dropres', res_drop_rate=0.1)
    assert isinstance(m.head.drop, torch.nn.Identity) and isinstance(m.head.global_pool.head_drop, ResidualDropout)


def test_timm_drop_path_fixes_for_resnest_and_rexnet():
    """ResNeSt's drop path acts on the branch (timm's acts on the block input); RexNet's on the added channels."""
    m = timm.create_model('resnest14d_dropres', drop_path_rate=0.5, res_drop_rate=0.0).train()
    block = m.layer1[0]
    x = torch.randn(4, block.conv1.in_channels, 8, 8)
    torch.manual_seed(0)
    out = block(x)
    assert out.shape[1] == block.bn3.num_features
    m = timm.create_model('rexnet_100_dropres', res_drop_rate=0.5).train()
    block = next(b for _, b in timm_dropres.residual_blocks(m) if b.conv_pwl.conv.out_channels > b.in_channels)
    x = torch.randn(2, block.in_channels, 8, 8)
    torch.manual_seed(0)
    dropped = block(x)
    block.eval()
    clean = block(x)
    # the widened channels (which go straight to the next block's BN) are never dropped
    assert torch.equal(dropped[:, block.in_channels:] != 0, clean[:, block.in_channels:] != 0)


@pytest.mark.parametrize('module', FAMILY_MODULES)
def test_skipped_architectures_are_refused_with_their_reason(module):
    skipped = [n for n in timm.list_models(module=module) if skip_reason(n)]
    for name in skipped:
        assert name + SUFFIX not in timm.list_models('*_dropres')
        model = timm.create_model(name, device='meta')
        with pytest.raises(TypeError, match='cannot place dropout'):
            timm_dropres.convert(model)
        assert timm_dropres.dropout_sites(model) == []
    assert all(any(fnmatch.fnmatchcase(n, p) for n in timm.list_models()) for p in FAMILY_SKIPPED)


@pytest.mark.parametrize('bad, why', [('densenet121', 'concatenate'),
                                      ('selecsls42b', 'concatenate'), ('vit_tiny_patch16_224', 'supported: ')])
def test_unsupported_families_are_refused_with_the_reason(bad, why):
    model = timm.create_model(bad, device='meta')
    with pytest.raises(TypeError, match=f'does not support model type .*{why}'):
        timm_dropres.convert(model)


@pytest.mark.parametrize('ctor', ['efficientnet_b0', 'mobilenet_v2', 'mobilenet_v3_small', 'regnet_x_400mf'])
def test_torchvision(ctor):
    base = getattr(torchvision.models, ctor)(num_classes=7)
    ours = getattr(torchvision.models, ctor)(num_classes=7)
    ours.load_state_dict(base.state_dict())
    timm_dropres.convert(ours, res_drop_rate=0.1, drop_rate=0.1)
    assert list(ours.state_dict()) == list(base.state_dict())
    assert not any(isinstance(m, torch.nn.Dropout) and not isinstance(m, ResidualDropout) for m in ours.modules())
    x = torch.randn(X)
    base.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
    report = audit(ours.train(), input_size=X[1:])
    assert report.compliant and not report.hazards
    assert sum(e.op == "ResidualDropout" for e in report.entries) == len(list(timm_dropres.residual_blocks(ours))) + 1


def test_pretrained_loads_the_base_weights_strictly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    base = timm.create_model('mobilenetv3_small_050')
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ref = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(ref, str(tmp_path / 'w.safetensors'))
    overlay = dict(file=str(tmp_path / 'w.safetensors'))
    m = timm.create_model('mobilenetv3_small_050_dropres.lamb_in1k', pretrained=True, pretrained_cfg_overlay=overlay)
    assert all(torch.equal(m.state_dict()[k], ref[k]) for k in ref) and m.state_dict().keys() == ref.keys()
    assert m.pretrained_cfg['architecture'] == 'mobilenetv3_small_050_dropres'
    assert m.pretrained_cfg['hf_hub_id'] == 'timm/mobilenetv3_small_050.lamb_in1k'
    m10 = timm.create_model('mobilenetv3_small_050_dropres.lamb_in1k', pretrained=True, num_classes=10,
                            pretrained_cfg_overlay=overlay)
    assert m10.classifier.out_features == 10 and torch.equal(m10.conv_stem.weight, ref['conv_stem.weight'])


def test_clip_resnets_take_residual_dropout_only():
    """issue 21 batch B: the CLIP ResNets' attention-pool head has no guideline position (a dropout before it is
    followed by its q/k/v projections: 'body'), so their twins carry residual dropout only and refuse drop_rate > 0."""
    base = timm.create_model('resnet50_clip', num_classes=7)
    ours = timm.create_model('resnet50_clip_dropres', num_classes=7, res_drop_rate=0.0)
    ours.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(X)
    base.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), base(x))
    assert families.head_dropout(ours) is None and timm_dropres.dropout_args(ours)['drop_rate'] == 0.0
    timm_dropres.convert(ours, res_drop_rate=0.1, drop_rate=0.0)
    sites = timm_dropres.dropout_sites(ours)
    assert len(sites) == len(list(timm_dropres.residual_blocks(ours))) > 1
    report = audit(ours, input_size=X[1:])
    assert all(e.verdict == 'ok' and e.location in SITE_LOCATIONS['after_last_bn']
               for e in report.entries if e.active)
    with pytest.raises(ValueError, match=r'drop_rate must be 0 for ByobNet \(its head is an attention pool.*got 0\.1'):
        timm.create_model('resnet50_clip_dropres', drop_rate=0.1, device='meta')
    other = timm.create_model('resnet50_clip', device='meta')
    with pytest.raises(ValueError, match='drop_rate must be 0'):
        timm_dropres.convert(other, drop_rate=0.1)
    assert timm_dropres.dropout_sites(other) == [] and type(other).__name__ == 'ByobNet'


def test_cpubone_and_repvit_heads_keep_their_dropout_and_build_without_a_pool():
    """issue 21 batch B: CPUBone's head dropout lives in its re-typed head (timm's reset rebuilds the pool, not the
    head), RepViT's in the model (its pool is a mean in forward_head); without a pool neither is applied."""
    from timm_dropres.models.family_blocks_b import DropResCpuBoneHead

    m = timm.create_model('cpubone_s0_dropres', num_classes=5, drop_rate=0.2, drop_path_rate=0.1)
    m.reset_classifier(3)
    assert isinstance(m.head, DropResCpuBoneHead) and families.head_dropout(m).p == 0.2
    assert m.head.classifier.dropout is None and m.head.dropout == 0.0  # no after-pool dropout, now or on reset
    m = timm.create_model('repvit_m0_9_dropres', num_classes=5, drop_rate=0.2)
    m.reset_classifier(3)
    assert families.head_dropout(m) is m.head_drop and m.head_drop.p == 0.2
    assert isinstance(m.head.head_drop, torch.nn.Identity) or m.head.head_drop.p == 0.0
    calls = []
    for pool, want in (('avg', 2), ('', 4)):
        f = timm.create_model('cpubone_s0_dropres', num_classes=0, global_pool=pool, drop_rate=0.5).train()
        f.head.head_drop.register_forward_hook(lambda *_, p=pool: calls.append(p))
        assert f(torch.randn(X)).dim() == want
    assert calls == ['avg']  # applied before the pool, not at all without one
    assert timm.create_model('repvit_m0_9_dropres', num_classes=0, global_pool='').global_pool == ''
