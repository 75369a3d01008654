"""Blocks of other timm families whose residual merge has no slot to compose the dropout with.

Most timm blocks call ``self.drop_path`` on the branch right before ``+ shortcut``, and
``families.convert_family`` composes the residual dropout with that call without touching the block's
forward. The blocks here have no such slot, or one at the wrong point, so each subclass re-states
``forward`` with one extra call to ``self.res_drop`` after the branch's last BatchNorm (and SE), before the
merge. They add no parameters or buffers; ``convert`` re-types existing blocks to them in place.

* DLA (``DlaBasic``, ``DlaBottleneck``, ``DlaBottle2neck``; ``DlaRoot`` with a shortcut): no drop path.
* GhostNet / RepGhostNet (``GhostBottleneck``, ``GhostBottleneckV3``, ``RepGhostBottleneck``): no drop path.
* ResNeSt (``ResNestBottleneck``): timm applies ``drop_path`` to the block *input* ``x``, which is dead code
  in blocks without a downsample and drops the shortcut's input in the others. Here both the residual dropout
  and ``drop_path`` act on the branch, as stochastic depth means.
* RexNet (``LinearBottleneck``): the branch is wider than the shortcut and only its first ``in_channels``
  channels are added to it; the rest go straight to the next block's BatchNorm. timm's ``drop_path`` drops all
  channels. Here both the residual dropout and ``drop_path`` act on the added channels only.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Type

import torch
import torch.nn as nn
from timm.models import dla, ghostnet, repghost, resnest, rexnet

__all__ = [
    'DropResDlaBasic', 'DropResDlaBottleneck', 'DropResDlaBottle2neck', 'DropResDlaRoot',
    'DropResGhostBottleneck', 'DropResGhostBottleneckV3', 'DropResRepGhostBottleneck',
    'DropResResNestBottleneck', 'DropResRexNetBottleneck', 'FAMILY_BLOCK_TYPES',
]


class DropResDlaBasic(dla.DlaBasic):
    """DLA basic block with residual dropout after ``bn2``."""

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.res_drop(self.bn2(self.conv2(out)))
        out += shortcut
        return self.relu(out)


class DropResDlaBottleneck(dla.DlaBottleneck):
    """DLA bottleneck with residual dropout after ``bn3``."""

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.res_drop(self.bn3(self.conv3(out)))
        out += shortcut
        return self.relu(out)


class DropResDlaBottle2neck(dla.DlaBottle2neck):
    """DLA Res2Net-style bottleneck with residual dropout after ``bn3``."""

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]  # for TorchScript, as in timm
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):  # noqa: B905 (TorchScript has no strict=)
            if i == 0 or self.is_first:
                sp = spx[i]
            else:
                sp = sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            spo.append(sp)
        if self.scale > 1:
            if self.pool is not None:
                spo.append(self.pool(spx[-1]))
            else:
                spo.append(spx[-1])
        out = torch.cat(spo, 1)
        out = self.res_drop(self.bn3(self.conv3(out)))
        out += shortcut
        return self.relu(out)


class DropResDlaRoot(dla.DlaRoot):
    """DLA aggregation node; with ``shortcut`` it adds its first child after ``bn``: dropout goes before that."""

    def forward(self, x_children: List[torch.Tensor]):
        x = self.bn(self.conv(torch.cat(x_children, 1)))
        if self.shortcut:
            x = self.res_drop(x)
            x += x_children[0]
        return self.relu(x)


class DropResGhostBottleneck(ghostnet.GhostBottleneck):
    """GhostNet (v1/v2) bottleneck with residual dropout after ``ghost2`` (which ends in BN, no activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.conv_dw(x)
            x = self.bn_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.res_drop(self.ghost2(x))
        x += self.shortcut(shortcut)
        return x


class DropResGhostBottleneckV3(ghostnet.GhostBottleneckV3):
    """GhostNetV3 bottleneck with residual dropout after ``ghost2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.stride > 1:
            if self.infer_mode:
                x = self.conv_dw(x)
                x = self.bn_dw(x)
            else:
                x1 = self.dw_rpr_scale(x)
                for dw_rpr_conv in self.dw_rpr_conv:
                    x1 += dw_rpr_conv(x)
                x = x1
        x = self.se(x)
        x = self.res_drop(self.ghost2(x))
        x += self.shortcut(shortcut)
        return x


class DropResRepGhostBottleneck(repghost.RepGhostBottleneck):
    """RepGhostNet bottleneck with residual dropout after ``ghost2``: the same branch layout (``ghost1``, optional
    ``conv_dw``/``bn_dw`` and ``se``, ``ghost2``, ``shortcut``) as GhostNet's, so it shares that forward."""

    forward = DropResGhostBottleneck.forward


class DropResResNestBottleneck(resnest.ResNestBottleneck):
    """ResNeSt bottleneck with residual dropout after ``bn3``; ``drop_path`` acts on the branch, not the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        out = self.act1(self.bn1(self.conv1(x)))
        if self.avd_first is not None:
            out = self.avd_first(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.drop_block(out)
        out = self.act2(out)
        if self.avd_last is not None:
            out = self.avd_last(out)
        out = self.res_drop(self.bn3(self.conv3(out)))
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        return self.act3(out)


class DropResRexNetBottleneck(rexnet.LinearBottleneck):
    """RexNet block: residual dropout (and ``drop_path``) on the channels that are added to the shortcut only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.act_dw(x)
        x = self.conv_pwl(x)
        if self.use_shortcut:
            res = self.res_drop(x[:, 0:self.in_channels])
            if self.drop_path is not None:
                res = self.drop_path(res)
            x = torch.cat([res + shortcut, x[:, self.in_channels:]], dim=1)
        return x


#: timm block class -> its dropres subclass (re-typed in place by ``convert``).
FAMILY_BLOCK_TYPES: Dict[Type[nn.Module], Type[nn.Module]] = {
    dla.DlaBasic: DropResDlaBasic,
    dla.DlaBottleneck: DropResDlaBottleneck,
    dla.DlaBottle2neck: DropResDlaBottle2neck,
    dla.DlaRoot: DropResDlaRoot,
    ghostnet.GhostBottleneck: DropResGhostBottleneck,
    ghostnet.GhostBottleneckV3: DropResGhostBottleneckV3,
    repghost.RepGhostBottleneck: DropResRepGhostBottleneck,
    resnest.ResNestBottleneck: DropResResNestBottleneck,
    rexnet.LinearBottleneck: DropResRexNetBottleneck,
}
