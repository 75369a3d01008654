"""Registration of the ``<arch>_dropres`` models with timm.

Every supported architecture of timm's ``resnet`` and ``resnetv2`` modules gets a ``_dropres``
twin whose pretrained tags mirror the base's (same ``hf_hub_id``/url, mean/std, sizes, license),
so ``pretrained=True`` loads the base weights strictly. The entrypoint builds the base architecture
through timm's own entrypoint, converts it, and lets ``build_model_with_cfg`` do the rest
(pretrained loading, classifier reset, ``features_only``), exactly as for a native timm model.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable, Dict, List

import timm
import torch.nn as nn
from timm.models import (
    DefaultCfg,
    build_model_with_cfg,
    get_arch_pretrained_cfgs,
    is_model_pretrained,
    model_entrypoint,
    register_model,
)

from .convert import convert
from .layers import AUTO, DEFAULT_HEAD_DROP_RATE, DEFAULT_RES_DROP_RATE, check_dropout_args
from .published import load_published, with_published_tags

__all__ = ['SUFFIX', 'SKIPPED', 'supported_base_models', 'mirrored_models', 'registered_models']

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

# pretrained-cfg fields that register_model() fills in for the new name
_RENAMED_FIELDS = ('architecture', 'tag')

default_cfgs: Dict[str, DefaultCfg] = {}


def _skip_reason(name: str) -> str | None:
    if name in SKIPPED:
        return SKIPPED[name]
    if '_bit' in name:
        return _SKIP_BIT
    return None


def supported_base_models() -> List[str]:
    """Names of the timm architectures that get a ``_dropres`` twin (deprecated aliases excluded)."""
    names = []
    for module in _BASE_MODULES:  # list_models(module=...) already leaves out deprecated aliases
        names += [n for n in sorted(timm.list_models(module=module)) if not n.endswith(SUFFIX) and not _skip_reason(n)]
    return names


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


def _register_all() -> None:
    published = load_published(known=mirrored_models())  # weights this project published, see published.py
    for base in supported_base_models():
        variant = base + SUFFIX
        mirrored = with_published_tags(variant, _mirror_cfgs(base), published)
        if mirrored is not None:
            default_cfgs[variant] = mirrored
        fn = _make_entrypoint(base)
        globals()[variant] = fn
        register_model(fn)


_register_all()
