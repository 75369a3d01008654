"""Placement for nine more timm families (issue 21, batch B): SENet (``legacy_se*``), CPUBone, RepViT, DPN,
StarNet, FasterNet, Xception (aligned and legacy) and Inception-ResNet-v2.

Each block subclass re-states ``forward`` with one extra call to ``self.res_drop`` and adds no parameters or
buffers; ``families.convert_family`` re-types existing blocks to them in place, as for ``family_blocks.py``. The
tables at the end (:data:`MERGE_SLOTS_B`, :data:`MODEL_CLASSES_B`, :data:`HEAD_PLACERS_B`, ...) hold plain values
and functions; ``families.py`` merges them into its own tables (this module cannot import it: it imports this one).

Where the residual dropout goes, read off each block's forward (timm 1.0.31):

* SENet (``SEResNetBlock``, ``SEBottleneck``, ``SEResNetBottleneck``, ``SEResNeXtBottleneck``): after the SE gate,
  which follows the last BN, before ``+ shortcut``. The blocks have no drop path.
* RepViT (``RepViTBlock``, ``RepVitDownsample``): the channel mixer's last ``ConvNorm`` (BN) ends the branch of
  ``identity + channel_mixer(x)``: the dropout goes after it. The legacy token mixer (``RepVggDw(legacy=True)``)
  adds two conv+BN branches to its input: the dropout goes on their sum, before ``+ x``. The other one applies
  its own BN to the merged sum, with no weight layer between (the "BN after the merge" that issue 21 lists as
  not placeable), so it gets none.
* DPN (``DualPathBlock``): pre-activation. The last conv's output is split: the first ``num_1x1_c`` channels are
  added to the residual path, the rest are concatenated as the dense path and read by the next block's BN. A
  dropout before the last conv would reach the dense path too; so the dropout acts on the residual part
  (``out1``) alone, before ``x_s1 + out1``, and the dense part is concatenated undropped (as for RexNet's
  widened channels).
* FasterNet (``MLPBlock``): the branch is ``partial conv -> conv -> BN -> act -> conv`` (the last BN is followed
  by a weight layer, as in pre-activation blocks): the dropout goes after that BN + act, right before the last
  conv, the paper's position. StarNet's ``Block`` has the same shape (``... g (conv + BN) -> dwconv2 (conv)``):
  ``families.py`` appends the dropout to ``g``.
* Aligned Xception, pre-activation (``PreXceptionModule``): the last separable conv starts with BN + act: the
  dropout goes after it, before that conv's depthwise and pointwise convs. The post-activation
  ``XceptionModule`` ends in BN and composes the dropout with its drop path (``families.py``).
* Inception-ResNet-v2 (``Block35``, ``Block17``, ``Block8``): each branch is conv+BN+ReLU, their concatenation
  goes through a 1x1 conv (no BN), is scaled and added: the dropout goes on the concatenation (after the last
  BN + ReLU), before that conv.

Heads: most of these models pool with timm's ``SelectAdaptivePool2d`` and ``families.py`` places the head dropout
there. CPUBone pools with ``nn.AdaptiveAvgPool2d`` inside its head, after the head's conv + BN + act: the
dropout goes before that pool (:class:`DropResCpuBoneHead`). RepViT pools by ``x.mean((2, 3))`` in
``forward_head`` and then runs ``NormLinear`` (BatchNorm1d + Linear): :class:`DropResRepVit` drops the feature
map before that mean. The BatchNorm1d then reads pooled values whose dropout noise the pool has averaged over all
positions (the audit's "head, before pooling"); dropout after pooling, timm's place, would feed it undiluted.

The CLIP ResNets (``resnet*_clip``, ByobNet with an ``AttentionPool2d`` head) have no head position: their pool is
a query-weighted average computed behind the q/k/v projections, and the audit calls a dropout before that head,
or timm's own inside it, off-guideline ("body", weight layers follow). Their blocks are ByobNet bottlenecks, which
take the residual dropout as usual; :data:`NO_HEAD_POSITION_B` says so, and ``convert`` then places no head dropout
and refuses ``drop_rate > 0`` (the twins default to 0).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import AttentionPool2d, RotAttentionPool2d
from timm.models import byobnet, cpubone, dpn, fasternet, repvit, senet, starnet
from timm.models import xception_aligned as xa
from timm.models.inception_resnet_v2 import Block8, Block17, Block35, InceptionResnetV2
from timm.models.xception import Block as XceptionBlock
from timm.models.xception import Xception

from .layers import HEAD_BEFORE_POOL, ResidualDropout

__all__ = [
    'DropResSEResNetBlock', 'DropResSEBottleneck', 'DropResSEResNetBottleneck', 'DropResSEResNeXtBottleneck',
    'DropResRepViTBlock', 'DropResRepVitDownsample', 'DropResRepVggDw', 'DropResDualPathBlock',
    'DropResFasterNetMLPBlock', 'DropResPreXceptionModule', 'DropResBlock35', 'DropResBlock17', 'DropResBlock8',
    'DropResCpuBoneHead', 'DropResRepVit',
    'FAMILY_BLOCK_TYPES_B', 'MERGE_SLOTS_B', 'MODEL_CLASSES_B', 'HEAD_PLACERS_B',
    'NO_HEAD_POSITION_B',
]


# --- SENet (senet.py, the legacy_se* models) -------------------------------------------------------------------

def _se_bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        shortcut = self.downsample(x)
    out = self.res_drop(self.se_module(out)) + shortcut
    return self.relu(out)


class DropResSEBottleneck(senet.SEBottleneck):
    """SENet-154 bottleneck with residual dropout after the SE gate (which follows ``bn3``)."""

    forward = _se_bottleneck_forward


class DropResSEResNetBottleneck(senet.SEResNetBottleneck):
    """Legacy SE-ResNet bottleneck with residual dropout after the SE gate."""

    forward = _se_bottleneck_forward


class DropResSEResNeXtBottleneck(senet.SEResNeXtBottleneck):
    """Legacy SE-ResNeXt bottleneck with residual dropout after the SE gate."""

    forward = _se_bottleneck_forward


class DropResSEResNetBlock(senet.SEResNetBlock):
    """Legacy SE-ResNet basic block with residual dropout after the SE gate (``bn2`` + ReLU, then SE)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out = self.res_drop(self.se_module(out)) + shortcut
        return self.relu(out)


# --- RepViT (repvit.py) ----------------------------------------------------------------------------------------

class DropResRepViTBlock(repvit.RepViTBlock):
    """RepViT block: residual dropout after the channel mixer's last ``ConvNorm``, before ``identity +``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        x = self.se(x)
        identity = x
        x = self.res_drop(self.channel_mixer(x))
        return identity + x


class DropResRepVitDownsample(repvit.RepVitDownsample):
    """RepViT downsample: residual dropout after the FFN's last ``ConvNorm``, before ``+ identity``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_block(x)
        x = self.spatial_downsample(x)
        x = self.channel_downsample(x)
        identity = x
        x = self.res_drop(self.ffn(x))
        return x + identity


class DropResRepVggDw(repvit.RepVggDw):
    """Legacy RepViT token mixer (two conv+BN branches plus the input): dropout on the branches' sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.res_drop(self.conv(x) + self.conv1(x)) + x)


class DropResRepVit(repvit.RepVit):
    """timm ``RepVit`` with the head dropout (``head_drop``) on the feature map before the mean pool."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # without a pool (global_pool='') there is no "before pooling" point: no head dropout, as timm's
        if self.global_pool == 'avg':
            x = self.head_drop(x)
            x = x.mean((2, 3), keepdim=False)
        if pre_logits:
            return x
        return self.head(x)


# --- DPN (dpn.py) ----------------------------------------------------------------------------------------------

class DropResDualPathBlock(dpn.DualPathBlock):
    """DPN block: residual dropout on the residual part of the last conv's output only (the dense part is
    concatenated undropped: it goes straight to the next block's BN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c1x1_w_s1 is not None:
            x_s = self.c1x1_w_s1(x)
        elif self.c1x1_w_s2 is not None:
            x_s = self.c1x1_w_s2(x)
        else:
            x_s = x
        x_s1 = x_s[:, :self.num_1x1_c]
        x_s2 = x_s[:, self.num_1x1_c:]
        x = self.c1x1_a(x)
        x = self.c3x3_b(x)
        x = self.c1x1_c(x)
        if self.c1x1_c1 is not None and self.c1x1_c2 is not None:
            out1 = self.c1x1_c1(x)
            out2 = self.c1x1_c2(x)
        else:
            out1 = x[:, :self.num_1x1_c]
            out2 = x[:, self.num_1x1_c:]
        return torch.cat([x_s1 + self.res_drop(out1), x_s2, out2], dim=1)


# --- FasterNet (fasternet.py) ----------------------------------------------------------------------------------

class DropResFasterNetMLPBlock(fasternet.MLPBlock):
    """FasterNet block: residual dropout after the MLP's BN + act, right before its last conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.spatial_mixing(x)
        x = self.mlp[2](self.mlp[1](self.mlp[0](x)))  # conv, BN, act
        x = self.mlp[3](self.res_drop(x))  # the last conv
        if self.layer_scale is not None:
            x = self.layer_scale.unsqueeze(-1).unsqueeze(-1) * x
        return shortcut + self.drop_path(x)


# --- Aligned Xception, pre-activation (xception_aligned.py: xception41p, xception65p) ----------------------------

class DropResPreXceptionModule(xa.PreXceptionModule):
    """Pre-activation Xception module: residual dropout after the last separable conv's BN + act.

    After timm's ``prune_to_tap`` (``prune_intermediate_layers``) the last separable conv is an ``nn.Identity``
    and the block has no residual: the dropout goes with it.
    """

    def _last(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.stack.conv3
        if hasattr(conv, 'conv_pw'):  # TorchScript evaluates this statically
            return conv.conv_pw(conv.conv_dw(self.res_drop(conv.norm(x))))
        return conv(x)  # pruned to the tap: an nn.Identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self._residual(self._last(self.stack.conv2(self.stack.conv1(x))), x)

    def forward_with_tap(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(x)
        x_tap = self.stack.conv2(self.stack.conv1(x))
        return self._residual(self._last(x_tap), x), x_tap


# --- Inception-ResNet-v2 (inception_resnet_v2.py) --------------------------------------------------------------

class DropResBlock35(Block35):
    """Inception-ResNet-A: residual dropout on the branches' concatenation, before the 1x1 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        out = self.conv2d(self.res_drop(out))
        return self.act(out * self.scale + x)


class DropResBlock17(Block17):
    """Inception-ResNet-B: residual dropout on the branches' concatenation, before the 1x1 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        out = self.conv2d(self.res_drop(out))
        return self.act(out * self.scale + x)


class DropResBlock8(Block8):
    """Inception-ResNet-C: residual dropout on the branches' concatenation, before the 1x1 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        out = self.conv2d(self.res_drop(out))
        out = out * self.scale + x
        if self.relu is not None:
            out = self.relu(out)
        return out


# --- heads -----------------------------------------------------------------------------------------------------

class DropResCpuBoneHead(cpubone.ClsHead):
    """CPUBone's classifier head with the head dropout (``head_drop``) after its conv + BN + act, before the global
    pool. Without a pool (``global_pool=''``) there is no "before pooling" point and the dropout is not applied;
    the features come out unpooled. ``reset()`` rebuilds the pool and classifier, not this module, so it stays."""

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.in_conv(x)
        if self.pool_type:
            x = self.head_drop(x)
        x = self.global_pool(x)
        x = self.flatten(x)
        if not self.pool_type:
            x = x.permute(0, 2, 3, 1)
        x = self.pre_classifier(x)
        if not pre_logits:
            x = self.classifier(x)
        if not self.pool_type:
            x = x.permute(0, 3, 1, 2).contiguous()
        return x


def _place_cpubone_head(model: nn.Module, drop_rate: float) -> None:
    """CPUBone: head dropout before ``head.global_pool`` (:class:`DropResCpuBoneHead`); the after-pool one off."""
    head = model.head
    if not isinstance(getattr(head, 'head_drop', None), ResidualDropout):
        head.__class__ = DropResCpuBoneHead
        head.head_drop = ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL)
    head.head_drop.p = drop_rate
    head.dropout = 0.0  # the rate head.reset() builds a new classifier's (after-pool) dropout with
    if isinstance(getattr(head.classifier, 'dropout', None), nn.Dropout):
        head.classifier.dropout = None


def _place_repvit_head(model: nn.Module, drop_rate: float) -> None:
    """RepViT: head dropout before the mean pool (``DropResRepVit.forward_head``); the after-pool ones off."""
    if not isinstance(model.head_drop, ResidualDropout):
        model.head_drop = ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL)
    model.head_drop.p = drop_rate
    if isinstance(getattr(model.head, 'head_drop', None), nn.Dropout) \
            and not isinstance(model.head.head_drop, ResidualDropout):
        model.head.head_drop = nn.Identity()
    if type(model) is repvit.RepVit:
        model.__class__ = DropResRepVit


_ATTENTION_POOL = ('its head is an attention pool (a query-weighted average behind q/k/v projections): a dropout '
                   'before or inside it is followed by weight layers, which the audit calls off-guideline, so there '
                   'is no head position; only the residual dropout is placed')


def _byobnet_attention_pool(model: nn.Module) -> Optional[str]:
    if isinstance(getattr(model, 'head', None), (AttentionPool2d, RotAttentionPool2d)):
        return _ATTENTION_POOL
    return None


# --- tables merged into families.py ----------------------------------------------------------------------------

def _always(block: nn.Module) -> bool:
    return True


def _cpubone_bn_residual(block: nn.Module) -> bool:
    # the stem and local-conv ResidualBlocks wrap an (Fused)MBConv ending in conv + BN; the attention and MLP
    # ResidualBlocks start with GroupNorm (no running statistics): they get no dropout, like LayerNorm blocks
    return block.shortcut is not None and isinstance(block.main, (cpubone.MBConv, cpubone.FusedMBConv))


#: timm block class -> its dropres subclass (re-typed in place by ``convert``).
FAMILY_BLOCK_TYPES_B: Dict[Type[nn.Module], Type[nn.Module]] = {
    senet.SEBottleneck: DropResSEBottleneck,
    senet.SEResNetBottleneck: DropResSEResNetBottleneck,
    senet.SEResNeXtBottleneck: DropResSEResNeXtBottleneck,
    senet.SEResNetBlock: DropResSEResNetBlock,
    repvit.RepViTBlock: DropResRepViTBlock,
    repvit.RepVitDownsample: DropResRepVitDownsample,
    repvit.RepVggDw: DropResRepVggDw,
    dpn.DualPathBlock: DropResDualPathBlock,
    fasternet.MLPBlock: DropResFasterNetMLPBlock,
    xa.PreXceptionModule: DropResPreXceptionModule,
    Block35: DropResBlock35,
    Block17: DropResBlock17,
    Block8: DropResBlock8,
}

#: block class -> ``(kind, attr, has_skip)`` for ``families.Slot``: ``'retype'`` for the classes above,
#: ``'compose'`` (the drop path slot) or ``'append'`` (the end of an ``nn.Sequential``) for the others.
MERGE_SLOTS_B: Dict[Type[nn.Module], Tuple[str, str, Callable[[nn.Module], bool]]] = {
    **{cls: ('retype', '', _always) for cls in FAMILY_BLOCK_TYPES_B},
    # only the legacy token mixer adds its input after two conv+BN branches; the other normalises the sum
    repvit.RepVggDw: ('retype', '', lambda b: bool(b.legacy)),
    # xception_aligned.py XceptionModule: `if not no_skip: x = drop_path(x) (if set); x = x + skip` after the
    # last separable conv's bn_pw (and act)
    xa.XceptionModule: ('compose', 'drop_path', lambda b: not b.no_skip),
    xa.PreXceptionModule: ('retype', '', lambda b: not b.no_skip),
    # xception.py Block: `x = self.rep(inp); x += skip`, rep ends in BN (or BN + max pool when strided)
    XceptionBlock: ('append', 'rep', _always),
    # starnet.py Block: `dwconv2(g(x))`, g is conv + BN and dwconv2 a conv alone: the dropout ends g
    starnet.Block: ('append', 'g', _always),
    # cpubone.py ResidualBlock: `drop_path(main(x)) + shortcut(x)`; main ends in the project conv + BN
    cpubone.ResidualBlock: ('compose', 'drop_path', _cpubone_bn_residual),
}

#: model class -> the attribute path of its ``SelectAdaptivePool2d`` (``''``: a placer below handles the head).
MODEL_CLASSES_B: Dict[Type[nn.Module], str] = {
    senet.SENet: 'global_pool',
    dpn.DPN: 'global_pool',
    starnet.StarNet: 'global_pool',
    fasternet.FasterNet: 'global_pool',
    xa.XceptionAligned: 'head.global_pool',
    Xception: 'global_pool',
    InceptionResnetV2: 'global_pool',
    cpubone.CPUBone: '',
    repvit.RepVit: '',
}

#: model class -> places the head dropout (and switches the after-pool dropouts off); converting again sets the rate.
HEAD_PLACERS_B: Dict[Type[nn.Module], Callable[[nn.Module, float], None]] = {
    cpubone.CPUBone: _place_cpubone_head,
    repvit.RepVit: _place_repvit_head,
}

#: model class -> why this model's head has no guideline position (``None``: it has one). Such a model gets the
#: residual dropout only; ``convert`` refuses ``drop_rate > 0`` for it.
NO_HEAD_POSITION_B: Dict[Type[nn.Module], Callable[[nn.Module], Optional[str]]] = {
    byobnet.ByobNet: _byobnet_attention_pool,
}
