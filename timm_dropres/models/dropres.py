"""Registration of the ``<arch>_dropres`` models with timm.

Every supported architecture of timm's ``resnet`` and ``resnetv2`` modules, and of the BatchNorm residual
families in ``FAMILY_MODULES`` (EfficientNet, MobileNetV3/V4, RegNet, ByobNet, CSPNet, DLA, HRNet, ...), gets a
``_dropres`` twin whose pretrained tags mirror the base's (same ``hf_hub_id``/url, mean/std, sizes, license),
so ``pretrained=True`` loads the base weights strictly. A ResNet-family entrypoint builds the base architecture
through timm's own entrypoint, converts it, and lets ``build_model_with_cfg`` do the rest (pretrained loading,
classifier reset, ``features_only``), exactly as for a native timm model. A family entrypoint calls the base's
timm entrypoint with this variant's pretrained cfg, so the family's own builder does all of that (including its
feature wrappers), and converts the result.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from collections import deque
from typing import Any, Callable, Dict, List, Tuple

import timm
import torch.nn as nn
from timm.models import (
    DefaultCfg,
    build_model_with_cfg,
    get_arch_pretrained_cfgs,
    is_model_pretrained,
    model_entrypoint,
    register_model,
    resolve_pretrained_cfg,
)

from .convert import convert
from .families import check_family_position, no_head_position
from .layers import AUTO, DEFAULT_HEAD_DROP_RATE, DEFAULT_RES_DROP_RATE, check_dropout_args
from .published import load_published, with_published_tags

__all__ = ['SUFFIX', 'SKIPPED', 'FAMILY_MODULES', 'FAMILY_SKIPPED', 'supported_base_models', 'mirrored_models',
           'registered_models', 'skip_reason', 'family_variants']

SUFFIX = '_dropres'
_BASE_MODULES = ('resnet', 'resnetv2')

#: Architectures of timm's resnet/resnetv2 modules left out, with the reason (also in the README).
SKIPPED: Dict[str, str] = {
    'resnet50_gn': 'GroupNorm: no BN running statistics, the guideline does not apply',
    'resnetv2_50d_gn': 'GroupNorm: no BN running statistics, the guideline does not apply',
    'resnetv2_50d_frn': 'FilterResponseNorm: no BN running statistics, the guideline does not apply',
    'resnetv2_50d_evos': 'EvoNorm: no BN running statistics, the guideline does not apply',
}
_SKIP_BIT = 'BiT: GroupNorm + weight-standardized convs, the guideline does not apply'

#: timm modules whose architectures get a twin through ``families.py`` (one generic placement per block class).
FAMILY_MODULES = (
    'efficientnet', 'mobilenetv3', 'hardcorenas', 'regnet', 'byobnet', 'byoanet', 'cspnet', 'cspnext', 'dla',
    'hrnet', 'rexnet', 'ghostnet', 'repghost', 'res2net', 'sknet', 'resnest', 'tresnet', 'hgnet', 'vovnet',
    'maxxvit',
    # issue 21 batch A (placement rows in family_blocks_a.py)
    'xcit', 'levit', 'efficientvit_msra', 'tiny_vit', 'efficientformer', 'efficientformer_v2', 'swiftformer',
    'shvit', 'nextvit', 'visformer',
    # issue 21 batch B
    'senet', 'cpubone', 'repvit', 'dpn', 'starnet', 'fasternet', 'xception_aligned', 'xception', 'inception_resnet_v2',
)
# issue 21 batch C
FAMILY_MODULES += ('fastvit', 'mobilevit', 'iformer', 'lowformer', 'efficientvit_mit', 'inception_next', 'convmixer',
                   'lcnetv2')

#: Architectures of ``FAMILY_MODULES`` left out (fnmatch patterns), with the reason that ``convert()`` gives too.
#: ``test_dropres.py`` builds each and checks that ``convert()`` refuses it.
_NO_MERGE = 'no residual merge: every block feeds the next one directly, so no position avoids the next BatchNorm'
_NO_BN = 'GroupNorm/EvoNorm instead of BatchNorm: no running statistics, the guideline does not apply'
_LN_ONLY = 'its residual blocks (ConvNeXt, transformer) normalise with LayerNorm: the guideline is about BatchNorm'
FAMILY_SKIPPED: Dict[str, str] = {
    '*_gn': _NO_BN, '*_sgn': _NO_BN, 'regnetz_*_evos': _NO_BN, 'ese_vovnet*_evos': _NO_BN,
    'mobilenetv1_*': _NO_MERGE, 'lcnet_*': _NO_MERGE, 'test_efficientnet*': _NO_MERGE,
    'vovnet39a': _NO_MERGE, 'vovnet57a': _NO_MERGE, 'ese_vovnet19b_*': _NO_MERGE,
    'coatnext_*': _LN_ONLY, 'maxxvit_*': _LN_ONLY, 'maxxvitv2_*': _LN_ONLY,
}

# pretrained-cfg fields that register_model() fills in for the new name
_RENAMED_FIELDS = ('architecture', 'tag')

default_cfgs: Dict[str, DefaultCfg] = {}


def skip_reason(name: str) -> str | None:
    """Why timm architecture ``name`` of a supported module has no ``_dropres`` twin, or ``None`` if it has one."""
    if name in SKIPPED:
        return SKIPPED[name]
    if '_bit' in name:
        return _SKIP_BIT
    for pattern, reason in FAMILY_SKIPPED.items():
        if fnmatch.fnmatchcase(name, pattern):
            return reason
    return None


_skip_reason = skip_reason


def supported_base_models(modules: Tuple[str, ...] | None = None) -> List[str]:
    """Names of the timm architectures that get a ``_dropres`` twin (deprecated aliases excluded).

    Args:
        modules: only these timm modules (default: ``resnet``, ``resnetv2`` and ``FAMILY_MODULES``).
    """
    names = []
    for module in modules or _BASE_MODULES + FAMILY_MODULES:  # list_models(module=...) leaves out deprecated aliases
        names += [n for n in sorted(timm.list_models(module=module)) if not n.endswith(SUFFIX) and not _skip_reason(n)]
    return names


def family_variants() -> List[str]:
    """The twins of ``FAMILY_MODULES`` architectures (placed by ``families.py``, not by ``blocks.py``)."""
    return [n + SUFFIX for n in supported_base_models(FAMILY_MODULES)]


def mirrored_models() -> List[str]:
    """The ``*_dropres`` twins of timm's resnet/resnetv2 architectures (what this module registers)."""
    return [n + SUFFIX for n in supported_base_models()]


def registered_models() -> List[str]:
    """Every ``*_dropres`` model this package registers: the timm mirrors and the paper's CIFAR networks."""
    return sorted(n for n in timm.list_models(f'*{SUFFIX}')
                  if model_entrypoint(n).__module__.startswith('timm_dropres.'))


def _mirror_cfgs(base: str) -> DefaultCfg | None:
    """The base's tags and pretrained cfgs with hub ids already resolved to the base weights."""
    cfgs = {}
    for full, cfg in get_arch_pretrained_cfgs(base).items():  # default tag first, as registered
        tag = full.partition('.')[2]
        cfgs[tag] = dataclasses.replace(cfg, **{f: None for f in _RENAMED_FIELDS})
    if not cfgs:
        return None
    return DefaultCfg(tags=deque(cfgs), cfgs=cfgs, is_pretrained=is_model_pretrained(base))


def _make_entrypoint(base: str) -> Callable[..., nn.Module]:
    base_fn = model_entrypoint(base)
    module = base_fn.__module__.rpartition('.')[2]
    variant = base + SUFFIX
    flatten = module == 'resnetv2'

    def _build(
            drop_rate: float = DEFAULT_HEAD_DROP_RATE,
            res_drop_rate: float = DEFAULT_RES_DROP_RATE,
            res_drop_pos: str = AUTO,
            **kwargs: Any,
    ) -> nn.Module:
        # validate first so bad input fails before any weights are built
        drop_rate, res_drop_rate, res_drop_pos = check_dropout_args(drop_rate, res_drop_rate, res_drop_pos)
        model = base_fn(pretrained=False, drop_rate=0.0, **kwargs)
        convert(model, res_drop_rate=res_drop_rate, drop_rate=drop_rate, res_drop_pos=res_drop_pos)
        model._model_args = dict(drop_rate=drop_rate, res_drop_rate=res_drop_rate, res_drop_pos=res_drop_pos)
        return model

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # a fresh dict per call: timm's builder updates feature_cfg in place (e.g. with feature_cls='fx')
        feature_cfg = dict(flatten_sequential=True) if flatten else None
        return build_model_with_cfg(_build, variant, pretrained, feature_cfg=feature_cfg, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f'timm ``{base}`` with dropout placed by Kim et al. (UAI 2023): one per residual block '
        f'(``res_drop_rate``, ``res_drop_pos``) and one before global pooling (``drop_rate``).')
    return entrypoint


def _make_family_entrypoint(base: str) -> Callable[..., nn.Module]:
    base_fn = model_entrypoint(base)
    variant = base + SUFFIX

    def entrypoint(
            pretrained: bool = False,
            drop_rate: float | None = None,
            res_drop_rate: float = DEFAULT_RES_DROP_RATE,
            res_drop_pos: str = AUTO,
            **kwargs: Any,
    ) -> nn.Module:
        # validate first so bad input fails before any weights are built or downloaded
        drop_rate, res_drop_rate, res_drop_pos = check_dropout_args(drop_rate, res_drop_rate, res_drop_pos)
        check_family_position(res_drop_pos, base)
        # this variant's pretrained cfg (the base's weights, mirrored, or a local-dir/hub config), resolved here
        # so the model reports this architecture; the base's own builder loads the weights strictly and builds
        # its feature wrappers for features_only
        cfg = resolve_pretrained_cfg(variant, kwargs.pop('pretrained_cfg', None),
                                     kwargs.pop('pretrained_cfg_overlay', None))
        model = base_fn(pretrained=pretrained, pretrained_cfg=cfg.to_dict(), drop_rate=0.0, **kwargs)
        if drop_rate is None:  # the default: 0 where the head has no position (issue 21 batch B: CLIP ResNets)
            drop_rate = 0.0 if no_head_position(model) is not None else DEFAULT_HEAD_DROP_RATE
        convert(model, res_drop_rate=res_drop_rate, drop_rate=drop_rate, res_drop_pos=res_drop_pos)
        model._model_args = dict(drop_rate=drop_rate, res_drop_rate=res_drop_rate, res_drop_pos=res_drop_pos)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f'timm ``{base}`` with dropout placed by Kim et al. (UAI 2023): one per residual block after its last '
        f'BatchNorm (``res_drop_rate``) and one before global pooling (``drop_rate``, default '
        f'{DEFAULT_HEAD_DROP_RATE}; 0 and no head dropout where the head has no global average pool).')
    return entrypoint


def _register_all() -> None:
    published = load_published(known=mirrored_models())  # weights this project published, see published.py
    for base in supported_base_models():
        variant = base + SUFFIX
        mirrored = with_published_tags(variant, _mirror_cfgs(base), published)
        if mirrored is not None:
            default_cfgs[variant] = mirrored
        family = model_entrypoint(base).__module__.rpartition('.')[2] in FAMILY_MODULES
        fn = _make_family_entrypoint(base) if family else _make_entrypoint(base)
        globals()[variant] = fn
        register_model(fn)


_register_all()
