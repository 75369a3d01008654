"""Issue 21, batch A: timm's hybrid BatchNorm families (XCiT, LeViT, EfficientViT-MSRA, TinyViT, ...).

These networks mix LayerNorm transformer blocks with BatchNorm residual branches. As for CoAtNet/MaxViT, only
the branches normalised by BatchNorm get a residual dropout, after their last BatchNorm (and layer scale), before
the merge; LayerNorm-only blocks get none. This module holds the re-stated blocks and heads, and the table rows
that ``families.py`` merges into its tables (kept here so ``families.py`` stays short). Plain data only: the slot
kinds are the strings ``families.Slot`` takes, so this module does not import ``families`` (which imports it).

* XCiT (``XCABlock``): three residual branches; only the local patch interaction (``LPI``: conv, GELU, BN, conv,
  then the layer scale ``gamma3``) holds a BatchNorm. Its own drop path ``drop_path3`` is the slot. The class
  attention blocks are LayerNorm only. The head pools in ``forward_head`` (the class token, or the mean of the
  patch tokens): ``DropResXcit`` drops the final token sequence before it pools.
* LeViT (``LevitBlock``): attention and MLP branches both end in ``LinearNorm``/``ConvNorm`` (a BatchNorm): one
  ``res_drop`` module, called on each branch (one mask per call). ``LevitDownsample``: its MLP branch, slot
  ``drop_path``. The head (``NormLinear``: BatchNorm1d, dropout, linear) comes after the mean pool:
  ``DropResLevit`` drops the map before the mean; the BatchNorm then reads the pooled vector, which the rule
  allows (noise averaged over the pooled positions), and ``NormLinear``'s own after-pool dropout is switched off.
* EfficientViT-MSRA (``ResidualDrop``: ``x + m(x)``, with its own sample-wise drop): every branch ends in a
  ``ConvNorm`` BatchNorm (depthwise conv, ``ConvMlp``, the attention's projection).
* TinyViT (``MBConv``): slot ``drop_path``; the ``TinyVitBlock`` branches are LayerNorm only.
* EfficientFormer (``MetaBlock2d``): the MLP branch (conv, BN, act, conv, BN, layer scale), slot ``drop_path2``;
  its pooling mixer (``pool(x) - x``) has no weight layer or BatchNorm. ``MetaBlock1d`` is LayerNorm only.
  EfficientFormerV2 (``EfficientFormerV2Block``): attention and MLP branches, each ending in conv + BN.
* SwiftFormer: ``ConvEncoder`` and ``LocalRepresentation`` (dw conv, BN, conv, act, conv, layer scale), slot
  ``drop_path``; ``Block``'s MLP branch (BN pre-norm), not its additive attention (no norm).
* SHViT (``Residual``: ``x + m(x)``): depthwise conv and FFN units; not the attention unit, whose input is
  normalised by GroupNorm.
* Next-ViT (``NextConvBlock``, ``NextTransformerBlock``): two / three BatchNorm branches, one module.
* Visformer (``Block``, BatchNorm pre-norms in ``visformer_tiny``/``visformer_small``): attention and MLP branches.
* EfficientViM is refused (:data:`REFUSED`): no head position the audit calls ``ok``.

Blocks with several BatchNorm branches hold one ``res_drop`` and call it once per branch (a fresh mask each call),
so a model has one residual dropout module per residual block, as everywhere else. Models that pool in
``forward_head`` (:data:`FORWARD_HEAD_MODELS`) are re-typed to a subclass whose ``forward_head`` drops the final
map or tokens before pooling.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, Type

import torch
import torch.nn as nn
from timm.models import (
    efficientformer,
    efficientformer_v2,
    efficientvit_msra,
    levit,
    nextvit,
    shvit,
    swiftformer,
    tiny_vit,
    visformer,
    xcit,
)

# FeatureGetterNet is in timm.models._features.__all__ but timm.models does not re-export it (timm 1.0.31)
from timm.models._features import FeatureGetterNet

__all__ = [
    'DropResLevitBlock', 'DropResEfficientVitResidual', 'DropResEfficientFormerV2Block', 'DropResSwiftFormerBlock',
    'DropResShvitResidual', 'DropResNextConvBlock', 'DropResNextTransformerBlock', 'DropResVisformerBlock',
    'DropResXcit', 'DropResLevit', 'DropResLevitDistilled', 'DropResEfficientFormer', 'DropResEfficientFormerV2',
    'DropResSwiftFormer',
    'BLOCK_TYPES', 'MERGE_SLOTS', 'HEAD_POOLS', 'FORWARD_HEAD_MODELS', 'LAYERNORM_BLOCKS', 'REFUSED',
    'FEATURE_CLASSES',
    'place_forward_head',
]


class DropResLevitBlock(levit.LevitBlock):
    """LeViT block: the residual dropout (one module, a fresh mask per call) ends the attention branch and the MLP
    branch, each after its last BatchNorm (``proj``'s / ``ln2``'s), before the drop path and the merge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.res_drop(self.attn(x)))
        x = x + self.drop_path2(self.res_drop(self.mlp(x)))
        return x


class DropResEfficientVitResidual(efficientvit_msra.ResidualDrop):
    """EfficientViT-MSRA residual unit ``x + m(x)``: the residual dropout after ``m``'s last BatchNorm, then the
    unit's own sample-wise drop (stochastic depth), then the merge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.res_drop(self.m(x))
        if self.training and self.drop > 0:
            return x + out * torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop).detach()
        return x + out


class DropResEfficientFormerV2Block(efficientformer_v2.EfficientFormerV2Block):
    """EfficientFormerV2 block: the residual dropout (one module, a fresh mask per call) after the attention's
    ``proj`` (conv + BN) and after the MLP's ``fc2`` (conv + BN), before layer scale, drop path and merge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mixer is not None:
            x = x + self.drop_path1(self.ls1(self.res_drop(self.token_mixer(x))))
        x = x + self.drop_path2(self.ls2(self.res_drop(self.mlp(x))))
        return x


class DropResSwiftFormerBlock(swiftformer.Block):
    """SwiftFormer block: the residual dropout ends the MLP branch (BN, conv, act, conv, layer scale), before the
    shared drop path; the additive-attention branch has no BatchNorm and gets none. The block's
    ``local_representation`` is a residual unit of its own (its ``drop_path`` slot)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local_representation(x)
        x = x + self.drop_path(self.layer_scale_1(self.attn(x)))
        x = x + self.drop_path(self.res_drop(self.layer_scale_2(self.linear(x))))
        return x


class DropResShvitResidual(shvit.Residual):
    """SHViT residual unit ``x + m(x)``: the residual dropout after ``m``'s last BatchNorm, before the merge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_drop(self.m(x))


class DropResNextConvBlock(nextvit.NextConvBlock):
    """Next-ViT convolution block: the residual dropout (one module, a fresh mask per call) ends the convolutional
    attention branch (conv, BN, act, conv) and the MLP branch (BN, conv, act, conv), before each drop path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.attn_drop_path(self.res_drop(self.mhca(x)))
        out = self.norm(x)
        x = x + self.mlp_drop_path(self.res_drop(self.mlp(out)))
        return x


class DropResNextTransformerBlock(nextvit.NextTransformerBlock):
    """Next-ViT transformer block: the residual dropout (one module, a fresh mask per call) ends each of its three
    BatchNorm branches (BN-normed efficient attention, convolutional attention, BN-normed MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        out = self.norm1(x)
        out = out.reshape(B, C, -1).transpose(-1, -2)
        out = self.mhsa_drop_path(self.res_drop(self.e_mhsa(out)))
        x = x + out.transpose(-1, -2).reshape(B, C, H, W)
        out = self.projection(x)
        out = out + self.mhca_drop_path(self.res_drop(self.mhca(out)))
        x = torch.cat([x, out], dim=1)
        out = self.norm2(x)
        x = x + self.mlp_drop_path(self.res_drop(self.mlp(out)))
        return x


class DropResVisformerBlock(visformer.Block):
    """Visformer block with BatchNorm pre-norms: the residual dropout (one module, a fresh mask per call) ends the
    attention branch and the MLP branch (after their last BatchNorm, the pre-norm), before the shared drop path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self.res_drop(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.res_drop(self.mlp(self.norm2(x))))
        return x


def _switch_off_after_pool(model: nn.Module) -> None:
    """Remove a model's after-pool dropouts (``NormLinear.drop`` of LeViT's heads); ``drop_rate`` 0 so that
    ``reset_classifier`` builds heads without one."""
    if isinstance(getattr(model, 'drop_rate', None), float):
        model.drop_rate = 0.0
    for attr in ('head', 'head_dist'):
        head = getattr(model, attr, None)
        if isinstance(getattr(head, 'drop', None), nn.Dropout):
            head.drop = nn.Identity()


class DropResXcit(xcit.Xcit):
    """XCiT with the head dropout (``head_drop``, a ``ResidualDropout``) on the final token sequence, before it is
    pooled (the class token selected, or the patch tokens averaged), instead of on the pooled vector."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == 'avg' else x[:, 0]
        return x if pre_logits else self.head(x)


class DropResLevit(levit.Levit):
    """LeViT with the head dropout (``head_drop``) on the final map, before the mean pool."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        if self.global_pool == 'avg':
            x = x.mean(dim=(-2, -1)) if self.use_conv else x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's ``reset_classifier``; the new head has no after-pool dropout (the head dropout stays)."""
        super().reset_classifier(num_classes, global_pool)
        _switch_off_after_pool(self)


class DropResLevitDistilled(levit.LevitDistilled):
    """Distilled LeViT (two heads) with the head dropout (``head_drop``) on the final map, before the mean pool."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> Any:
        x = self.head_drop(x)
        if self.global_pool == 'avg':
            x = x.mean(dim=(-2, -1)) if self.use_conv else x.mean(dim=1)
        if pre_logits:
            return x
        x, x_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's ``reset_classifier``; the new heads have no after-pool dropout (the head dropout stays)."""
        super().reset_classifier(num_classes, global_pool)
        _switch_off_after_pool(self)



class DropResEfficientFormer(efficientformer.EfficientFormer):
    """EfficientFormer with the head dropout on the final (LayerNorm-ed) tokens, before the mean pool."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> Any:
        x = self.head_drop(x)
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        if pre_logits:
            return x
        x, x_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


class DropResEfficientFormerV2(efficientformer_v2.EfficientFormerV2):
    """EfficientFormerV2 with the head dropout on the final map (after its BatchNorm), before the mean pool."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> Any:
        x = self.head_drop(x)
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        x, x_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


class DropResSwiftFormer(swiftformer.SwiftFormer):
    """SwiftFormer with the head dropout on the final map (after its BatchNorm), before the mean pool (the same
    head as EfficientFormerV2's with distillation)."""

    forward_head = DropResEfficientFormerV2.forward_head

def _always(block: nn.Module) -> bool:
    return True


#: timm block class -> its dropres subclass (``families.FAMILY_BLOCK_TYPES`` takes these rows).
BLOCK_TYPES: Dict[Type[nn.Module], Type[nn.Module]] = {
    levit.LevitBlock: DropResLevitBlock,
    efficientvit_msra.ResidualDrop: DropResEfficientVitResidual,
    efficientformer_v2.EfficientFormerV2Block: DropResEfficientFormerV2Block,
    swiftformer.Block: DropResSwiftFormerBlock,
    shvit.Residual: DropResShvitResidual,
    nextvit.NextConvBlock: DropResNextConvBlock,
    nextvit.NextTransformerBlock: DropResNextTransformerBlock,
    visformer.Block: DropResVisformerBlock,
}

#: block class -> ``(slot kind, attribute, has_skip)``, the fields of ``families.Slot``; read off each forward
#: (timm 1.0.31). ``retype`` rows are the classes of ``BLOCK_TYPES``.
MERGE_SLOTS: Dict[Type[nn.Module], Tuple[str, str, Callable[[nn.Module], bool]]] = {
    # xcit.py: `x = x + self.drop_path3(self.gamma3 * self.local_mp(self.norm3(x), H, W))`, LPI's BN before conv2
    xcit.XCABlock: ('compose', 'drop_path3', _always),
    # levit.py: `x = x + self.drop_path(self.mlp(x))`, the MLP ending in ln2 (linear + BN)
    levit.LevitDownsample: ('compose', 'drop_path', _always),
    levit.LevitBlock: ('retype', '', _always),
    efficientvit_msra.ResidualDrop: ('retype', '', _always),
    # tiny_vit.py: `x = self.drop_path(x); x += shortcut` after conv3 (conv + BN)
    tiny_vit.MBConv: ('compose', 'drop_path', _always),
    # efficientformer.py: `x = x + self.drop_path2(self.ls2(self.mlp(x)))`, the MLP ending in norm2 (BN); the
    # pooling mixer branch (`pool(x) - x`) has no weight layer and no BatchNorm
    efficientformer.MetaBlock2d: ('compose', 'drop_path2', _always),
    efficientformer_v2.EfficientFormerV2Block: ('retype', '', _always),
    # swiftformer.py: `x = input + self.drop_path(x)` after dwconv, BN, pwconv1, act, pwconv2, layer scale
    swiftformer.ConvEncoder: ('compose', 'drop_path', _always),
    swiftformer.LocalRepresentation: ('compose', 'drop_path', _always),
    swiftformer.Block: ('retype', '', _always),
    # shvit.py: `x + self.m(x)`; the single-head attention unit pre-normalises with GroupNorm, so it gets none
    shvit.Residual: ('retype', '', lambda b: not isinstance(b.m, shvit.SHSA)),
    nextvit.NextConvBlock: ('retype', '', _always),
    nextvit.NextTransformerBlock: ('retype', '', _always),
    # visformer.py: BatchNorm pre-norms in visformer_tiny/small (LayerNorm2d elsewhere: refused, not BatchNorm)
    visformer.Block: ('retype', '', _always),
}

#: model class -> attribute path of its ``SelectAdaptivePool2d`` (``families.Head(pool=...)``).
HEAD_POOLS: Dict[Type[nn.Module], str] = {
    efficientvit_msra.EfficientVitMsra: 'global_pool',  # then NormLinear (BN1d, drop, linear): drop switched off
    tiny_vit.TinyVit: 'head.global_pool',  # NormMlpClassifierHead: pool, LayerNorm2d, pre-logits, drop, fc
    shvit.SHViT: 'global_pool',  # then flatten, forward_head's F.dropout(drop_rate) (set to 0), NormLinear (BN1d)
    nextvit.NextViT: 'head.global_pool',  # ClassifierHead: pool, drop, fc
    visformer.Visformer: 'global_pool',  # then head_drop (switched off), head
}

#: model classes that pool in ``forward_head`` -> the subclass that drops the map before pooling there.
FORWARD_HEAD_MODELS: Dict[Type[nn.Module], Type[nn.Module]] = {
    xcit.Xcit: DropResXcit,
    levit.Levit: DropResLevit,
    levit.LevitDistilled: DropResLevitDistilled,
    efficientformer.EfficientFormer: DropResEfficientFormer,
    efficientformer_v2.EfficientFormerV2: DropResEfficientFormerV2,
    swiftformer.SwiftFormer: DropResSwiftFormer,
}

#: residual blocks normalised by LayerNorm only: no dropout, and they do not make ``convert()`` refuse the model.
LAYERNORM_BLOCKS: Tuple[Type[nn.Module], ...] = (
    xcit.ClassAttentionBlock, tiny_vit.TinyVitBlock, efficientformer.MetaBlock1d)


#: the feature wrapper ``features_only`` builds for XCiT, LeViT, EfficientFormer and Visformer
#: (``feature_cls='getter'``): its blocks are converted, it has no head.
FEATURE_CLASSES: Tuple[Type[nn.Module], ...] = (FeatureGetterNet,)

_VIM_HEAD = ("its classifier reads every stage's state-space hidden state (B, C, state) and the final map "
             '(B, C, H*W), each averaged along its last axis: no head position is a global pool over spatial '
             'positions that the audit recognises, so no head dropout position is audited ok')

#: model classes ``convert()`` refuses, with the reason (class path -> reason; ``families.REFUSED`` takes these rows).
REFUSED: Dict[str, str] = {
    'timm.models.efficientvim.EfficientViM': _VIM_HEAD,
    'timm.models.efficientvim.EfficientViMDistilled': _VIM_HEAD,
}

def place_forward_head(model: nn.Module, base: Type[nn.Module], head_drop: nn.Module) -> None:
    """Give a model of :data:`FORWARD_HEAD_MODELS` its head dropout (``head_drop``, before pooling) and switch off
    its after-pool dropouts (XCiT's ``head_drop``, which this one replaces; LeViT's ``NormLinear.drop``)."""
    model.head_drop = head_drop
    _switch_off_after_pool(model)
    model.__class__ = FORWARD_HEAD_MODELS[base]
