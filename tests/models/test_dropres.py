"""Registry: which architectures get a twin, and that pretrained tags mirror the base's."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import _registry

import timm_dropres
from timm_dropres.models.dropres import SKIPPED, SUFFIX

REGISTERED = timm_dropres.models.dropres.mirrored_models()
#: the ResNet family (blocks.py); the other families' twins are checked by tests/models/test_families.py and, each
#: one on the meta device, by the coverage run (tests/research/test_coverage.py)
RESNET_FAMILY = sorted(set(REGISTERED) - set(timm_dropres.models.dropres.family_variants()))
REQUIRED = [
    'resnet18', 'resnet26', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet18d', 'resnet26d', 'resnet26t',
    'resnet34d', 'resnet50d', 'resnet50t', 'resnet101d', 'resnet152d', 'resnext50_32x4d', 'resnext101_32x4d',
    'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2', 'seresnet50', 'seresnext50_32x4d',
    'ecaresnet50d', 'ecaresnext26t_32x4d', 'resnetv2_18', 'resnetv2_34', 'resnetv2_50', 'resnetv2_101',
    'resnetv2_18d', 'resnetv2_34d', 'resnetv2_50d', 'resnetv2_101d',
]


def test_required_variants_registered():
    listed = set(timm.list_models('*_dropres'))
    missing = [a for a in REQUIRED if a + SUFFIX not in listed]
    assert not missing
    assert {n for n in listed if _registry._model_to_module[n] == 'dropres'} == set(REGISTERED)
    cifar = {n for n in timm_dropres.models.cifar.cifar_model_names() if n.endswith(SUFFIX)}
    assert set(timm_dropres.registered_models()) == set(REGISTERED) | cifar


def test_every_non_deprecated_arch_is_registered_or_skipped_with_reason():
    for module in ('resnet', 'resnetv2'):
        for name in timm.list_models(module=module):
            if name.endswith(SUFFIX):
                continue
            assert (name + SUFFIX in REGISTERED) != (timm_dropres.models.dropres._skip_reason(name) is not None), name


def test_deprecated_aliases_not_mirrored():
    assert 'tv_resnet50_dropres' not in REGISTERED
    assert 'gluon_resnet50_v1b_dropres' not in REGISTERED


def test_skipped_architectures_really_cannot_be_converted():
    names = list(SKIPPED) + ['resnetv2_50x1_bit', 'resnetv2_101x1_bit']
    for name in names:
        model = timm.create_model(name, device='meta')
        before = type(model)
        with pytest.raises(TypeError, match='not BatchNorm'):
            timm_dropres.convert(model)
        assert type(model) is before and not hasattr(model, 'head_drop')


@pytest.mark.parametrize('tagged', ['resnet50.a1_in1k', 'resnet18.tv_in1k', 'resnetv2_50.a1h_in1k',
                                    'seresnext50_32x4d.racm_in1k', 'wide_resnet50_2.racm_in1k'])
def test_pretrained_tags_mirror_base(tagged):
    arch, tag = tagged.split('.')
    base = timm.get_pretrained_cfg(tagged)
    ours = timm.get_pretrained_cfg(f'{arch}{SUFFIX}.{tag}')
    assert ours.hf_hub_id == base.hf_hub_id == f'timm/{tagged}'
    for field in ('mean', 'std', 'input_size', 'crop_pct', 'interpolation', 'license', 'num_classes',
                  'test_input_size', 'url', 'hf_hub_filename', 'first_conv', 'classifier'):
        assert getattr(ours, field) == getattr(base, field), field
    assert ours.architecture == f'{arch}{SUFFIX}' and ours.tag == tag


def test_list_pretrained_mirrors_every_base_tag():
    for variant in REGISTERED:
        base = variant[:-len(SUFFIX)]
        base_tags = {n.split('.', 1)[1] for n in timm.list_pretrained(base) if '.' in n and n.split('.')[0] == base}
        ours = {n.split('.', 1)[1] for n in timm.list_pretrained(variant) if n.split('.')[0] == variant}
        assert base_tags <= ours, variant


def test_default_tag_is_base_default():
    defaults = _registry._model_default_cfgs
    assert defaults['resnet50_dropres'].tags[0] == defaults['resnet50'].tags[0]
    assert timm.get_pretrained_cfg('resnet50_dropres').hf_hub_id == timm.get_pretrained_cfg('resnet50').hf_hub_id


@pytest.mark.parametrize('variant', RESNET_FAMILY)
def test_state_dict_matches_base_every_variant(variant):
    """Keys and shapes equal the base's and strict loading works both ways (meta device: no memory)."""
    base_name = variant[:-len(SUFFIX)]
    ours = timm.create_model(variant, device='meta', num_classes=7)
    base = timm.create_model(base_name, device='meta', num_classes=7)
    sd_ours, sd_base = ours.state_dict(), base.state_dict()
    assert list(sd_ours) == list(sd_base)
    assert all(sd_ours[k].shape == sd_base[k].shape for k in sd_base)
    ours.load_state_dict(sd_base, strict=True, assign=True)
    base.load_state_dict(sd_ours, strict=True, assign=True)
    blocks = list(timm_dropres.residual_blocks(ours))
    sites = timm_dropres.dropout_sites(ours)
    assert len(sites) == len(blocks) + 1
    out = ours(torch.empty(2, 3, 64, 64, device='meta'))
    assert out.shape == (2, 7)
