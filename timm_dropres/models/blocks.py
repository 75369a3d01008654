"""Residual blocks with one dropout in the residual branch.

Each class subclasses the timm or torchvision block it extends and re-states only ``forward``,
with one extra call to ``self.res_drop``. They add no parameters or buffers, so state dicts are
those of the base block. ``convert`` turns an existing block into one of these in place by
re-typing it (same object, same tensors), which is how retrofitting keeps pretrained weights.

At ``after_last_bn`` the dropout sits right before the residual addition. In a train-mode forward with
autograd on (``layers.fuse_with_add``) the post-activation blocks without stochastic depth call
``residual_dropout_add`` instead: dropout, addition and, when the activation is ``nn.ReLU``, the ReLU in
one op (one Triton kernel each way on CUDA, one pass on CPU). TorchScript, eval mode, ``torch.no_grad`` and
``set_dropout_kernel('unfused')`` run the separate modules and ops as before.

Positions (see ``docs/placement.md``):

* Pre-activation (``PreActBasic``/``PreActBottleneck``): after the last norm + act, right before
  the last conv. This is the paper's guideline exactly; there is no other candidate.
* Post-activation (timm ``BasicBlock``/``Bottleneck``, torchvision's): ``after_last_bn`` (after the
  last BN and SE/attention, before the residual addition) or ``before_last_conv`` (after the
  BN + act that precede the last conv).
"""

from typing import Dict, Type

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.models import resnet as timm_resnet
from timm.models import resnetv2 as timm_resnetv2
from torchvision.models import resnet as tv_resnet

from .layers import fuse_with_add, residual_dropout_add

# torch.fx: the blocks call residual_dropout_add from this module's globals; wrap the name here too, so a
# symbolic trace records one call (as layers.py does for its own globals)
torch.fx.wrap('residual_dropout_add')

# The forwards compare ``res_drop_pos`` with string literals equal to ``layers.AFTER_LAST_BN`` and
# ``layers.BEFORE_LAST_CONV``: TorchScript cannot read a module-level string constant inside ``forward``
# (tests/models/test_fx.py scripts these blocks); tests/models/test_convert.py checks the values agree.
__all__ = [
    'DropResBasicBlock', 'DropResBottleneck', 'DropResPreActBasic', 'DropResPreActBottleneck',
    'DropResTvBasicBlock', 'DropResTvBottleneck', 'BLOCK_TYPES', 'PRE_ACT_BLOCKS', 'block_norms',
]


def _fused_tail(block: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(shortcut' + res_drop(x))`` through ``residual_dropout_add``, ``shortcut'`` after the downsample.

    The ReLU goes into the fused op when ``act`` is exactly ``nn.ReLU``; any other activation runs after
    it as a module. The sum is written into ``x``, as the block's own ``x += shortcut`` does.
    """
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    relu = type(act) is nn.ReLU
    out = residual_dropout_add(x, shortcut, block.res_drop.p, True, relu, inplace=True)
    return out if relu else act(out)


class DropResBasicBlock(timm_resnet.BasicBlock):
    """timm post-activation basic block (ResNet-18/34) with residual dropout."""

    res_drop_pos: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        if self.res_drop_pos == 'before_last_conv':
            x = self.res_drop(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        if not torch.jit.is_scripting():  # TorchScript keeps the separate ops below
            if self.res_drop_pos == 'after_last_bn' and self.drop_path is None and fuse_with_add(self.res_drop):
                return _fused_tail(self, x, shortcut, self.act2)
        if self.res_drop_pos == 'after_last_bn':
            x = self.res_drop(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class DropResBottleneck(timm_resnet.Bottleneck):
    """timm post-activation bottleneck (ResNet-50+, ResNeXt, Wide-ResNet, SE/ECA) with residual dropout."""

    res_drop_pos: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        if self.res_drop_pos == 'before_last_conv':
            x = self.res_drop(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if not torch.jit.is_scripting():  # TorchScript keeps the separate ops below
            if self.res_drop_pos == 'after_last_bn' and self.drop_path is None and fuse_with_add(self.res_drop):
                return _fused_tail(self, x, shortcut, self.act3)
        if self.res_drop_pos == 'after_last_bn':
            x = self.res_drop(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class DropResPreActBasic(timm_resnetv2.PreActBasic):
    """timm pre-activation basic block (resnetv2_18/34) with the paper's dropout before the last conv."""

    res_drop_pos: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.res_drop(self.norm2(x))
        x = self.conv2(x)
        x = self.drop_path(x)
        return x + shortcut


class DropResPreActBottleneck(timm_resnetv2.PreActBottleneck):
    """timm pre-activation bottleneck (resnetv2_50+) with the paper's dropout before the last conv."""

    res_drop_pos: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.res_drop(self.norm3(x))
        x = self.conv3(x)
        x = self.drop_path(x)
        return x + shortcut


class DropResTvBasicBlock(tv_resnet.BasicBlock):
    """torchvision basic block with residual dropout (for ``convert``)."""

    res_drop_pos: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        if self.res_drop_pos == 'before_last_conv':
            out = self.res_drop(out)
        out = self.bn2(self.conv2(out))
        if not torch.jit.is_scripting():  # TorchScript keeps the separate ops below
            if self.res_drop_pos == 'after_last_bn' and fuse_with_add(self.res_drop):
                return _fused_tail(self, out, x, self.relu)
        if self.res_drop_pos == 'after_last_bn':
            out = self.res_drop(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class DropResTvBottleneck(tv_resnet.Bottleneck):
    """torchvision bottleneck (ResNet-50+, ResNeXt, Wide-ResNet) with residual dropout (for ``convert``)."""

    res_drop_pos: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.res_drop_pos == 'before_last_conv':
            out = self.res_drop(out)
        out = self.bn3(self.conv3(out))
        if not torch.jit.is_scripting():  # TorchScript keeps the separate ops below
            if self.res_drop_pos == 'after_last_bn' and fuse_with_add(self.res_drop):
                return _fused_tail(self, out, x, self.relu)
        if self.res_drop_pos == 'after_last_bn':
            out = self.res_drop(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


#: base block class -> dropres block class. Anything not listed here is refused by ``convert``.
BLOCK_TYPES: Dict[Type[nn.Module], Type[nn.Module]] = {
    timm_resnet.BasicBlock: DropResBasicBlock,
    timm_resnet.Bottleneck: DropResBottleneck,
    timm_resnetv2.PreActBasic: DropResPreActBasic,
    timm_resnetv2.PreActBottleneck: DropResPreActBottleneck,
    tv_resnet.BasicBlock: DropResTvBasicBlock,
    tv_resnet.Bottleneck: DropResTvBottleneck,
}

#: dropres block classes whose branch is pre-activation (a single candidate position).
PRE_ACT_BLOCKS = (DropResPreActBasic, DropResPreActBottleneck)

_NORM_ATTRS = {
    timm_resnet.BasicBlock: ('bn1', 'bn2'),
    timm_resnet.Bottleneck: ('bn1', 'bn2', 'bn3'),
    timm_resnetv2.PreActBasic: ('norm1', 'norm2'),
    timm_resnetv2.PreActBottleneck: ('norm1', 'norm2', 'norm3'),
    tv_resnet.BasicBlock: ('bn1', 'bn2'),
    tv_resnet.Bottleneck: ('bn1', 'bn2', 'bn3'),
}


def block_norms(block: nn.Module) -> Dict[str, nn.Module]:
    """The branch's norm layers by attribute name, for checking that they are BatchNorm."""
    base = next((b for b, d in BLOCK_TYPES.items() if type(block) in (b, d)), None)
    if base is None:
        raise TypeError(f'{type(block).__name__} is not a ResNet-family block; valid: '
                        f'{sorted({b.__name__ for b in BLOCK_TYPES})}')
    return {name: getattr(block, name) for name in _NORM_ATTRS[base]}


def is_supported_norm(block: nn.Module, norm: nn.Module) -> bool:
    """The guideline rests on BN's running statistics: pre-act blocks need timm's BatchNormAct2d
    (norm + act in one module), post-act blocks plain BatchNorm."""
    if isinstance(block, (timm_resnetv2.PreActBasic, timm_resnetv2.PreActBottleneck)):
        return type(norm) is BatchNormAct2d
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and not isinstance(norm, BatchNormAct2d)
