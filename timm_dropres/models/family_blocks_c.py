"""Placement tables and re-stated blocks for timm's hybrid and mobile BatchNorm families (issue 21, batch C).

FastViT, MobileViT, iFormer, LowFormer, EfficientViT (MIT), InceptionNeXt, ConvMixer and LCNetV2. ``families.py``
merges these tables into its own (:data:`SLOTS`, :data:`BLOCK_TYPES`, :data:`MODEL_POOLS`, :data:`HEAD_HOOKS`,
:data:`LAYERNORM_BLOCKS`), so the placement rule stays the one stated there: the residual dropout goes after the
branch's last BatchNorm (and layer scale / attention), before the merge; the head dropout before global pooling.

What each family needs, read off its source (timm 1.0.31):

* FastViT: ``RepMixerBlock`` (``x = token_mixer(x); x = x + drop_path(layer_scale(mlp(x)))``) and
  ``AttentionBlock`` (attention, then ``x + drop_path2(layer_scale_2(mlp(x)))``): one dropout per block, composed
  with the drop path of its last branch, the ``ConvMlp`` (depthwise conv + BN, then two 1x1 convs), like the one
  per block of a ResNet. The token mixers are left alone: ``RepMixer``'s branch (``BN(dwconv(x)) - BN(x)``, folded
  into one depthwise conv at inference) and the attention branch (pre-norm BN, or LayerNorm2d in ``mci3``/``mci4``).
* MobileViT: ``ByobNet`` with byobnet's bottlenecks (already placed) and transformer blocks normalised by LayerNorm
  (``vision_transformer.Block``) or GroupNorm with one group (``LinearTransformerBlock``): no dropout there.
* iFormer: every ``Residual`` (``x + gamma * drop_path(module(x))``, each branch ending in conv + BN): composed with
  the drop path. Its head has no pool module (``x.mean((2, 3))`` in ``forward_head``) and a BatchNorm1d after the
  pool (``NormLinear``): :class:`DropResIFormer` re-states ``forward_head`` with the head dropout before the mean.
  The BatchNorm1d reads the pooled vector, after a pool over every position (the audit's rule: ``ok``).
* LowFormer: ``ResidualBlock`` (``drop_path(main(x)) + shortcut(x)``): composed with the drop path where the branch
  is normalised by BatchNorm alone (the MBConv / FusedMBConv blocks). The attention and MLP branches are pre-normed
  by ``GroupNorm1`` (a LayerNorm over C, H, W), the transformer part of the hybrid, and get none.
* EfficientViT (MIT): ``ResidualBlock`` has no drop path: :class:`DropResEfficientVitResidual` re-states it. Its
  ``ClassifierHead`` keeps an after-pool ``nn.Dropout`` inside ``classifier``, switched off by a head hook.
* InceptionNeXt: ``MetaNeXtBlock`` ends ``x = self.drop_path(x) + shortcut`` after BN -> MLP -> layer scale.
* ConvMixer: ``Residual(fn)`` with ``fn`` = depthwise conv -> GELU -> BN, an ``nn.Sequential``: the dropout ends it.
* LCNetV2: ``RepDepthwiseSeparable`` adds its shortcut with no drop path: :class:`DropResLcNetV2Block` re-states it.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.models import (
    convmixer,
    efficientvit_mit,
    fastvit,
    iformer,
    inception_next,
    lcnetv2,
    lowformer,
    mobilevit,
    vision_transformer,
)

from .layers import HEAD_BEFORE_POOL, ResidualDropout

__all__ = [
    'DropResLcNetV2Block', 'DropResEfficientVitResidual', 'DropResIFormer', 'SLOTS', 'BLOCK_TYPES', 'MODEL_POOLS',
    'HEAD_HOOKS', 'LAYERNORM_BLOCKS', 'REFUSED',
]


class DropResLcNetV2Block(lcnetv2.RepDepthwiseSeparable):
    """LCNetV2 block with residual dropout after ``pw_conv`` (conv + BN + act), before ``+ shortcut``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.dw_conv is not None:
            x = self.dw_act(self.dw_conv(x))
        else:
            out = self.dw_conv_list[0](x)
            for i, dw_conv in enumerate(self.dw_conv_list):
                if i > 0:
                    out = out + dw_conv(x)
            x = self.dw_act(out)
        x = self.se(x)
        x = self.pw_conv(x)
        if self.use_shortcut:
            x = self.res_drop(x) + shortcut
        return x


class DropResEfficientVitResidual(efficientvit_mit.ResidualBlock):
    """EfficientViT residual block with residual dropout after ``main`` (its last conv + BN), before the shortcut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.main(self.pre_norm(x))
        if self.shortcut is not None:
            res = self.res_drop(res) + self.shortcut(x)
        return res


class DropResIFormer(iformer.IFormer):
    """iFormer with the head dropout (``head_drop``) on the feature map, before the global mean.

    timm's ``head_drop`` (an ``nn.Dropout`` after the mean) and the classifier's own one are replaced.
    """

    def forward_head(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        x = self.head_drop(x)
        if self.global_pool == 'avg':
            x = x.mean((2, 3), keepdim=False)
        if pre_logits:
            return x
        return self.head(x)


def _iformer_head(model: nn.Module, drop_rate: float) -> None:
    """Place iFormer's head dropout before its mean (it has no pool module) and remove the after-pool ones."""
    if isinstance(model.head_drop, ResidualDropout):
        model.head_drop.p = drop_rate
    else:
        model.head_drop = ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL)
    if isinstance(getattr(model.head, 'head_drop', None), nn.Dropout):  # RepVitClassifier's, after the pool
        model.head.head_drop = nn.Identity()
    model.__class__ = DropResIFormer


def _efficientvit_head(model: nn.Module, drop_rate: float) -> None:
    """Switch off the ``nn.Dropout`` in EfficientViT's classifier (after the pool); the pool's is placed already."""
    classifier = model.head.classifier
    for i, m in enumerate(classifier):
        if isinstance(m, nn.Dropout) and not isinstance(m, ResidualDropout):
            classifier[i] = nn.Identity()


def _always(block: nn.Module) -> bool:
    return True


def _shortcut(block: nn.Module) -> bool:
    return block.shortcut is not None


def _lowformer_bn_branch(block: nn.Module) -> bool:
    """A LowFormer residual block with a skip path whose branch is normalised by BatchNorm only (not GroupNorm1)."""
    return block.shortcut is not None and not any(isinstance(m, nn.GroupNorm) for m in block.main.modules())


#: block class -> (slot kind, attribute, has_skip), as ``families.Slot`` takes them.
SLOTS: Dict[Type[nn.Module], Tuple[str, str, Callable[[nn.Module], bool]]] = {
    fastvit.RepMixerBlock: ('compose', 'drop_path', _always),
    fastvit.AttentionBlock: ('compose', 'drop_path2', _always),
    iformer.Residual: ('compose', 'drop_path', _always),
    lowformer.ResidualBlock: ('compose', 'drop_path', _lowformer_bn_branch),
    inception_next.MetaNeXtBlock: ('compose', 'drop_path', _always),
    convmixer.Residual: ('append', 'fn', _always),
    efficientvit_mit.ResidualBlock: ('retype', '', _shortcut),
    lcnetv2.RepDepthwiseSeparable: ('retype', '', lambda b: bool(b.use_shortcut)),
}

#: timm block class -> its re-stated subclass (``SLOTS`` kind ``retype``).
BLOCK_TYPES: Dict[Type[nn.Module], Type[nn.Module]] = {
    efficientvit_mit.ResidualBlock: DropResEfficientVitResidual,
    lcnetv2.RepDepthwiseSeparable: DropResLcNetV2Block,
}

#: model class -> the attribute path of its global pool (``''``: the head hook places the head dropout itself).
MODEL_POOLS: Dict[Type[nn.Module], str] = {
    fastvit.FastVit: 'head.global_pool',
    iformer.IFormer: '',
    lowformer.LowFormer: 'global_pool',
    efficientvit_mit.EfficientVit: 'head.global_pool',
    efficientvit_mit.EfficientVitLarge: 'head.global_pool',
    inception_next.MetaNeXt: 'head.global_pool',
    convmixer.ConvMixer: 'global_pool',
    lcnetv2.LCNetV2: 'global_pool',
}

#: model class -> ``hook(model, drop_rate)``: places the head dropout where there is no pool module (pool path
#: ``''``), or switches off an after-pool dropout that ``families._place_head`` does not know (after it ran).
HEAD_HOOKS: Dict[Type[nn.Module], Callable[[nn.Module, float], None]] = {
    iformer.IFormer: _iformer_head,
    efficientvit_mit.EfficientVit: _efficientvit_head,
    efficientvit_mit.EfficientVitLarge: _efficientvit_head,
}

#: residual blocks without BatchNorm in the hybrids above (MobileViT's transformers): no dropout, no refusal.
LAYERNORM_BLOCKS: Tuple[Type[nn.Module], ...] = (vision_transformer.Block, mobilevit.LinearTransformerBlock)

_NAS = ('its merges sit inside NAS cells: several per cell, each adding a separable-conv branch (ending in BN) to a '
        'max/avg pool or to another such branch, the sums concatenated; no block has one residual merge to drop, '
        'and a sum of two conv+BN branches feeds the next cell\'s BatchNorm')

#: model classes of the batch's modules that convert() refuses (class path -> reason).
REFUSED: Dict[str, str] = {
    'timm.models.nasnet.NASNetALarge': _NAS,
    'timm.models.pnasnet.PNASNet5Large': _NAS,
}
