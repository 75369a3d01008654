"""The CIFAR networks the paper reports on, as timm models, with and without our dropout.

* ``preresnet{20,56,110}_cifar``: pre-activation ResNet for CIFAR (He et al., "Identity Mappings in
  Deep Residual Networks", 2016), basic blocks, ``(depth - 2) / 6`` blocks per stage, widths 16-32-64.
* ``preresnet164_cifar``: the bottleneck form, ``(depth - 2) / 9`` blocks per stage, widths 64-128-256
  (bottleneck widths 16-32-64).
* ``wrn28_10_cifar``: Wide-ResNet-28-10 (Zagoruyko & Komodakis, 2016), basic blocks, widths 160-320-640.

Each has a ``*_dropres`` twin (e.g. ``preresnet110_cifar_dropres``) taking ``drop_rate``,
``res_drop_rate`` and ``res_drop_pos`` like every other ``*_dropres`` model.

Why timm's ``ResNetV2`` with a swapped stem rather than new classes: its ``PreActBasic`` /
``PreActBottleneck`` blocks are exactly He et al.'s pre-activation units (BN-ReLU-conv-BN-ReLU-conv, 1x1
projection from the pre-activated input when the shape changes, a final BN-ReLU before pooling), and
``convert`` already places the dropout in them. So the twins go through the same ``convert`` as
``resnetv2_50_dropres``: the same placement semantics, ``describe``, ``dropout_args`` and export, by
construction. Only the ImageNet stem (7x7/2 conv + max-pool) is replaced by the CIFAR one: a 3x3/1 conv
with 16 channels and no pooling.

The weights are He-initialised with the last conv of each branch *not* zeroed (``zero_init_last=False``,
as in both papers); a zeroed last conv would also hide the residual dropout from any analysis of a
freshly built model. No pretrained weights are published: the default cfgs carry no url or hub id.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Sequence, Tuple

import torch.nn as nn
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnetv2 import ResNetV2

from .convert import convert
from .layers import AUTO, DEFAULT_HEAD_DROP_RATE, DEFAULT_RES_DROP_RATE, check_dropout_args

__all__ = ['CIFAR_ARCHS', 'cifar_model_names']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: name -> (blocks per stage, stage output widths, basic block?)
CIFAR_ARCHS: Dict[str, Tuple[Tuple[int, int, int], Tuple[int, int, int], bool]] = {
    'preresnet20_cifar': ((3, 3, 3), (16, 32, 64), True),
    'preresnet56_cifar': ((9, 9, 9), (16, 32, 64), True),
    'preresnet110_cifar': ((18, 18, 18), (16, 32, 64), True),
    'preresnet164_cifar': ((18, 18, 18), (64, 128, 256), False),
    'wrn28_10_cifar': ((4, 4, 4), (160, 320, 640), True),
}
_STEM_CHS = 16
# stem + three stages: four feature levels, not timm's default five
_FEATURE_CFG = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))


def cifar_model_names() -> list[str]:
    """Every name this module registers (plain and ``_dropres``)."""
    return [n for base in CIFAR_ARCHS for n in (base, base + '_dropres')]


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc', 'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in cifar_model_names()})


def _cifar_resnetv2(
        layers: Sequence[int],
        channels: Sequence[int],
        basic: bool,
        in_chans: int = 3,
        zero_init_last: bool = False,
        **kwargs: Any,
) -> ResNetV2:
    """timm's pre-activation ``ResNetV2`` with the CIFAR stem (3x3/1 conv, 16 channels, no pooling)."""
    if kwargs.get('output_stride', 32) != 32:
        raise ValueError(f'CIFAR networks do not support output_stride={kwargs["output_stride"]}; only 32')
    model = ResNetV2(
        layers=list(layers), channels=tuple(channels), in_chans=in_chans, stem_chs=_STEM_CHS, preact=True,
        basic=basic, bottle_ratio=1.0 if basic else 0.25, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
        zero_init_last=zero_init_last, **kwargs)
    conv = create_conv2d(in_chans, _STEM_CHS, 3, stride=1)
    nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')  # as ResNetV2 inits its convs
    model.stem = nn.Sequential(OrderedDict([('conv', conv)]))
    model.stem_feat_idx = 0
    # ResNetV2 assumed a stride-4 stem; the CIFAR stem keeps full resolution, so stages reduce by 1, 2, 4
    reductions = [1, 1, 2, 4]
    model.feature_info = [dict(info, reduction=r) for info, r in zip(model.feature_info, reductions, strict=True)]
    return model


def _build(variant: str, pretrained: bool, **kwargs: Any) -> ResNetV2:
    layers, channels, basic = CIFAR_ARCHS[variant.removesuffix('_dropres')]
    return build_model_with_cfg(
        _cifar_resnetv2, variant, pretrained, layers=layers, channels=channels, basic=basic,
        feature_cfg=dict(_FEATURE_CFG), **kwargs)


def _build_dropres(
        variant: str,
        pretrained: bool,
        drop_rate: float = DEFAULT_HEAD_DROP_RATE,
        res_drop_rate: float = DEFAULT_RES_DROP_RATE,
        res_drop_pos: str = AUTO,
        **kwargs: Any,
) -> ResNetV2:
    """Base network, then ``convert``: the one code path that places dropout (see ``convert.py``)."""
    drop_rate, res_drop_rate, res_drop_pos = check_dropout_args(drop_rate, res_drop_rate, res_drop_pos)
    layers, channels, basic = CIFAR_ARCHS[variant.removesuffix('_dropres')]

    def fn(**kw: Any) -> ResNetV2:
        model = _cifar_resnetv2(layers, channels, basic, **kw)
        convert(model, res_drop_rate=res_drop_rate, drop_rate=drop_rate, res_drop_pos=res_drop_pos)
        model._model_args = dict(drop_rate=drop_rate, res_drop_rate=res_drop_rate, res_drop_pos=res_drop_pos)
        return model

    return build_model_with_cfg(fn, variant, pretrained, feature_cfg=dict(_FEATURE_CFG), **kwargs)


def _entrypoint(variant: str, builder: Callable[..., ResNetV2], doc: str) -> Callable[..., ResNetV2]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ResNetV2:
        return builder(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = doc
    return entrypoint


def _register_all() -> None:
    for base, (layers, channels, _basic) in CIFAR_ARCHS.items():
        desc = f'{base}: pre-activation CIFAR network, blocks {layers}, widths {channels}'
        for variant, builder, doc in (
                (base, _build, f'{desc}; no dropout (timm ``drop_rate`` drops after pooling).'),
                (base + '_dropres', _build_dropres,
                 f'{desc}; dropout before the last conv of every block and before global pooling (Kim et al.).'),
        ):
            fn = _entrypoint(variant, builder, doc)
            globals()[variant] = fn
            register_model(fn)


_register_all()
