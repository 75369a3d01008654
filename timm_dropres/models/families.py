"""Dropout for timm's (and torchvision's) other BatchNorm residual CNN families, by one generic mechanism.

Most residual blocks in timm end their branch with ``x = self.drop_path(x) + shortcut`` (or
``x = self.drop_path(x); x += shortcut``) right after the branch's last BatchNorm (and SE/attention). The residual
dropout goes exactly there: ``convert`` replaces the block's ``drop_path`` with a :class:`DropResMerge` that runs
the ``ResidualDropout`` and then the original drop path. The block's forward is not touched, and nothing with
parameters moves, so state dicts, strict loading and eval outputs stay the base model's.

The table :data:`MERGE_SLOTS` says, per block class, where that point is (one of three kinds of slot) and when
the block has a skip path at all: blocks without one get no dropout, since their output feeds the next block's
BatchNorm. Blocks whose merge has no slot, or whose ``drop_path`` sits at the wrong point, have a subclass that
re-states ``forward`` (``family_blocks.py``). :data:`MODEL_CLASSES` lists the model classes whose head is known:
the head dropout goes into their global pool (before pooling) and their own after-pool dropout is switched off.
Anything else is refused with the reason (:data:`REFUSED`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple, Type

import torch
import torch.nn as nn
import torchvision.models as tvm
from timm.layers import SelectAdaptivePool2d
from timm.models import (
    FeatureDictNet,
    FeatureHookNet,  # issue 21 batch B
    FeatureHooks,
    FeatureListNet,
    byobnet,
    cspnet,
    cspnext,
    dla,
    efficientnet,
    ghostnet,
    hgnet,
    hrnet,
    maxxvit,
    mobilenetv3,
    regnet,
    repghost,
    res2net,
    resnet,
    rexnet,
    sknet,
    tresnet,
    vovnet,
)
from timm.models import _efficientnet_blocks as eb
from timm.models._features import FeatureGetterNet  # issue 21 batch C (timm.models does not export it)
from torchvision.models import efficientnet as tv_efficientnet
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import mobilenetv3 as tv_mobilenetv3
from torchvision.models import regnet as tv_regnet

from . import family_blocks_a  # issue 21 batch A
from . import family_blocks_c as _fbc  # issue 21 batch C
from .family_blocks import FAMILY_BLOCK_TYPES
from .family_blocks_b import (  # issue 21 batch B
    FAMILY_BLOCK_TYPES_B,
    HEAD_PLACERS_B,
    MERGE_SLOTS_B,
    MODEL_CLASSES_B,
    NO_HEAD_POSITION_B,
)
from .heads import DropResNet
from .layers import AFTER_LAST_BN, AUTO, HEAD_BEFORE_POOL, ResidualDropout

__all__ = [
    'DropResMerge', 'DropResSelectAdaptivePool2d', 'Slot', 'MERGE_SLOTS', 'MODEL_CLASSES', 'REFUSED',
    'family_sites', 'is_family_block', 'is_family_model', 'convert_family', 'refusal', 'check_family_position',
    'head_dropout', 'residual_dropouts', 'no_head_position',
]


class DropResMerge(nn.Module):
    """The residual dropout composed with a block's drop path, in the block's ``drop_path`` slot.

    Runs ``res_drop`` (a ``ResidualDropout``) and then the block's own drop path (``DropPath``, torchvision's
    ``StochasticDepth``, or ``nn.Identity`` when the block had none), so stochastic depth keeps its rate.

    Args:
        res_drop: the residual dropout.
        drop_path: the module the slot held before (``None`` becomes ``nn.Identity``).
    """

    def __init__(self, res_drop: ResidualDropout, drop_path: nn.Module | None) -> None:
        super().__init__()
        self.res_drop = res_drop
        self.drop_path = drop_path if drop_path is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.res_drop(x))


class DropResSelectAdaptivePool2d(SelectAdaptivePool2d):
    """timm's global pool with the head dropout on the feature map before it pools (``head_drop``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_drop(x)
        x = self.pool(x)
        return self.flatten(x)


COMPOSE, APPEND, RETYPE = 'compose', 'append', 'retype'


@dataclass(frozen=True)
class Slot:
    """Where a block's residual dropout goes.

    Attributes:
        kind: ``'compose'`` (replace attribute ``attr``, the drop path, by a ``DropResMerge``), ``'append'``
            (add ``res_drop`` at the end of the ``nn.Sequential`` ``attr``, the branch) or ``'retype'`` (switch
            the block to its ``family_blocks`` subclass, whose forward calls ``self.res_drop``).
        attr: the attribute the slot is, for ``compose`` and ``append``.
        has_skip: whether this block instance merges its branch with a skip path (no skip, no dropout).
    """

    kind: str
    attr: str
    has_skip: Callable[[nn.Module], bool]


def _always(block: nn.Module) -> bool:
    return True


def _has_skip(block: nn.Module) -> bool:
    return bool(block.has_skip)


def _use_res_connect(block: nn.Module) -> bool:
    return bool(block.use_res_connect)


def _compose(has_skip: Callable[[nn.Module], bool] = _always, attr: str = 'drop_path') -> Slot:
    return Slot(COMPOSE, attr, has_skip)


#: block class -> its slot. Each entry was read off the block's forward (timm 1.0.31, torchvision 0.29): the slot
#: is applied to the branch after its last BatchNorm (and SE/attention), and nothing but the skip operand is
#: added to it afterwards.
MERGE_SLOTS: Dict[Type[nn.Module], Slot] = {
    # _efficientnet_blocks.py: `if self.has_skip: x = self.drop_path(x) + shortcut` after bn2 / bn3 (+ layer scale)
    **{cls: _compose(_has_skip) for cls in (
        eb.ConvBnAct, eb.DepthwiseSeparableConv, eb.InvertedResidual, eb.UniversalInvertedResidual,
        eb.MobileAttention, eb.CondConvResidual, eb.EdgeResidual)},
    # regnet.py: `if self.downsample is not None: x = self.drop_path(x) + self.downsample(shortcut)` after conv3's BN
    regnet.Bottleneck: _compose(lambda b: b.downsample is not None),
    regnet.PreBottleneck: _compose(lambda b: b.downsample is not None),
    # byobnet.py: `x = self.drop_path(x); if self.shortcut is not None: x = x + self.shortcut(shortcut)`: the drop
    # path runs in blocks without a shortcut too, where its output feeds the next block's BN: no dropout there
    **{cls: _compose(lambda b: b.shortcut is not None) for cls in (
        byobnet.BasicBlock, byobnet.BottleneckBlock, byobnet.DarkBlock, byobnet.EdgeBlock, byobnet.SelfAttnBlock)},
    # RepVGG / MobileOne: drop_path on the sum of the conv+BN branches, then `+= identity` (a BN of the input)
    byobnet.RepVggBlock: _compose(lambda b: b.identity is not None and b.reparam_conv is None),
    byobnet.MobileOneBlock: _compose(lambda b: b.identity is not None and b.reparam_conv is None),
    # cspnet.py: `x = self.drop_path(x) + shortcut` after conv3 / conv2 (BN) and attention; cspnext.py likewise
    **{cls: _compose() for cls in (cspnet.BottleneckBlock, cspnet.DarkBlock, cspnet.EdgeBlock)},
    cspnext.CspNextBlock: _compose(lambda b: b.add_identity),
    # ResNet-class blocks of other modules: `if self.drop_path is not None: x = self.drop_path(x)` after the last
    # BN (+ SE), then `x += shortcut`. resnet.py's own blocks appear here inside HRNet.
    res2net.Bottle2neck: _compose(),
    sknet.SelectiveKernelBasic: _compose(),
    sknet.SelectiveKernelBottleneck: _compose(),
    resnet.BasicBlock: _compose(),
    resnet.Bottleneck: _compose(),
    # tresnet.py: `out = self.drop_path(out) + shortcut` after conv2 / conv3 (ConvNormAct without act) and SE
    tresnet.BasicBlock: _compose(),
    tresnet.Bottleneck: _compose(),
    # hgnet.py: `if self.residual: x = self.drop_path(x) + identity` after the aggregation conv+BN
    hgnet.HighPerfGpuBlock: _compose(lambda b: b.residual),
    # vovnet.py: `x = self.drop_path(x)` after the concat conv+BN (and ESE), then `if self.residual: x = x + identity`:
    # without a residual the drop path feeds the next stage's BN, so those blocks get no dropout
    vovnet.OsaBlock: _compose(lambda b: b.residual),
    # maxxvit.py (CoAtNet, MaxViT): MbConvBlock, pre-norm BN: `x = self.drop_path(x) + shortcut` after conv3_1x1
    maxxvit.MbConvBlock: _compose(),
    # blocks re-stated in family_blocks.py
    **{cls: Slot(RETYPE, '', _always) for cls in FAMILY_BLOCK_TYPES},
    # GhostNet / RepGhost: `x += self.shortcut(shortcut)`. A downsampling block's shortcut is dw conv + BN + conv + BN:
    # two weight layers, so by the audit's rule (docs/placement.md, "residual merge") the sum adds two parallel
    # branches, and its output feeds the next block's BN. Only identity shortcuts are residual merges.
    ghostnet.GhostBottleneck: Slot(RETYPE, '', lambda b: len(list(b.shortcut.children())) == 0),
    ghostnet.GhostBottleneckV3: Slot(RETYPE, '', lambda b: len(list(b.shortcut.children())) == 0),
    repghost.RepGhostBottleneck: Slot(RETYPE, '', lambda b: len(list(b.shortcut.children())) == 0),
    dla.DlaRoot: Slot(RETYPE, '', lambda b: bool(b.shortcut)),
    rexnet.LinearBottleneck: Slot(RETYPE, '', lambda b: bool(b.use_shortcut)),
    # torchvision: MBConv/FusedMBConv `result = self.stochastic_depth(result); result += input`
    tv_efficientnet.MBConv: _compose(_use_res_connect, 'stochastic_depth'),
    tv_efficientnet.FusedMBConv: _compose(_use_res_connect, 'stochastic_depth'),
    # MobileNetV2/V3 `x + self.conv(x)` / `result = self.block(x); result += x`; RegNet `x + self.f(x)`: the
    # branch is an nn.Sequential ending in conv + BN (no activation)
    tv_mobilenetv2.InvertedResidual: Slot(APPEND, 'conv', _use_res_connect),
    tv_mobilenetv3.InvertedResidual: Slot(APPEND, 'block', _use_res_connect),
    tv_regnet.ResBottleneckBlock: Slot(APPEND, 'f', _always),
}
# issue 21 batch B: SENet, CPUBone, RepViT, DPN, StarNet, FasterNet, Xception, Inception-ResNet-v2 (family_blocks_b)
FAMILY_BLOCK_TYPES.update(FAMILY_BLOCK_TYPES_B)
MERGE_SLOTS.update({cls: Slot(*spec) for cls, spec in MERGE_SLOTS_B.items()})


@dataclass(frozen=True)
class Head:
    """How a model class pools: the head dropout goes into its ``SelectAdaptivePool2d`` (``pool``: the attribute
    path), or at the end of the ``nn.Sequential`` feature trunk (``trunk``) for torchvision models."""

    pool: str = ''
    trunk: str = ''


#: model class -> its head. Their after-pool dropouts (``drop_rate`` read in ``forward_head``, a
#: ``ClassifierHead``'s ``drop``, a ``head_drop`` Dropout, torchvision's ``classifier`` Dropout) are switched off.
MODEL_CLASSES: Dict[Type[nn.Module], Head] = {
    efficientnet.EfficientNet: Head(pool='global_pool'),
    mobilenetv3.MobileNetV3: Head(pool='global_pool'),
    ghostnet.GhostNet: Head(pool='global_pool'),
    repghost.RepGhostNet: Head(pool='global_pool'),
    dla.DLA: Head(pool='global_pool'),
    hrnet.HighResolutionNet: Head(pool='global_pool'),
    regnet.RegNet: Head(pool='head.global_pool'),
    byobnet.ByobNet: Head(pool='head.global_pool'),
    cspnet.CspNet: Head(pool='head.global_pool'),
    cspnext.CspNext: Head(pool='head.global_pool'),
    rexnet.RexNet: Head(pool='head.global_pool'),
    tresnet.TResNet: Head(pool='head.global_pool'),
    hgnet.HighPerfGpuNet: Head(pool='head.global_pool'),
    vovnet.VovNet: Head(pool='head.global_pool'),
    maxxvit.MaxxVit: Head(pool='head.global_pool'),
    resnet.ResNet: Head(pool='global_pool'),  # res2net, sknet, resnest: blocks from other modules
    tvm.EfficientNet: Head(trunk='features'),
    tvm.MobileNetV2: Head(trunk='features'),
    tvm.MobileNetV3: Head(trunk='features'),
    tvm.RegNet: Head(trunk='trunk_output'),
}
# issue 21 batch B (a pool path of '': the family's placer in HEAD_PLACERS_B places the head dropout)
MODEL_CLASSES.update({cls: Head(pool=pool) for cls, pool in MODEL_CLASSES_B.items()})

#: residual blocks normalised by LayerNorm only (the transformer and ConvNeXt blocks of hybrid families): the
#: guideline is about BatchNorm, so they get no dropout, and they do not make convert() refuse the model.
LAYERNORM_BLOCKS: Tuple[Type[nn.Module], ...] = (
    maxxvit.TransformerBlock2d, maxxvit.PartitionAttentionCl, maxxvit.PartitionAttention2d,
    maxxvit.ParallelPartitionAttention, maxxvit.ConvNeXtBlock)

#: feature-extraction wrappers and backbones without a classifier: blocks are converted, there is no head.
FEATURE_CLASSES: Tuple[Type[nn.Module], ...] = (
    FeatureListNet, FeatureDictNet, FeatureHooks, efficientnet.EfficientNetFeatures, mobilenetv3.MobileNetV3Features,
    hrnet.HighResolutionNetFeatures)
FEATURE_CLASSES += (FeatureHookNet,)  # issue 21 batch B: features_only of the Xceptions

# issue 21 batch C: FastViT, MobileViT, iFormer, LowFormer, EfficientViT (MIT), InceptionNeXt, ConvMixer, LCNetV2
# (their tables and re-stated blocks are in family_blocks_c.py); FeatureGetterNet: ConvMixer's features_only wrapper
MERGE_SLOTS.update({cls: Slot(*slot) for cls, slot in _fbc.SLOTS.items()})
FAMILY_BLOCK_TYPES.update(_fbc.BLOCK_TYPES)
MODEL_CLASSES.update({cls: Head(pool=pool) for cls, pool in _fbc.MODEL_POOLS.items()})
#: model class -> places its head dropout: alone where the model has no pool path (``''``: CPUBone, RepViT,
#: iFormer), or after the pool's (EfficientViT's classifier); converting again sets the rate.
HEAD_HOOKS: Dict[Type[nn.Module], Callable[[nn.Module, float], None]] = {**HEAD_PLACERS_B, **_fbc.HEAD_HOOKS}
LAYERNORM_BLOCKS += _fbc.LAYERNORM_BLOCKS
FEATURE_CLASSES += (FeatureGetterNet,)

#: model classes convert() refuses for a reason of their own (class path -> reason, in its error message).
REFUSED: Dict[str, str] = {
    'timm.models.selecsls.SelecSls': 'its blocks concatenate their branches: no residual merge',
    'timm.models.densenet.DenseNet': 'dense blocks concatenate: no residual merge',
    'timm.models.vgg.VGG': 'no residual merge',
}
REFUSED.update(_fbc.REFUSED)  # issue 21 batch C


def _get(model: nn.Module, path: str) -> nn.Module | None:
    obj: object = model
    for part in path.split('.'):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, nn.Module) else None


def _slot(block: nn.Module) -> Slot | None:
    cls = type(block)
    slot = MERGE_SLOTS.get(cls)
    if slot is None:  # an already converted block
        for base, sub in FAMILY_BLOCK_TYPES.items():
            if cls is sub:
                return MERGE_SLOTS[base]
    return slot


def _norms(block: nn.Module) -> List[nn.Module]:
    return [m for m in block.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            or type(m).__name__.startswith(('EvoNorm', 'FilterResponseNorm'))]


def _non_bn_norms(block: nn.Module) -> List[str]:
    """Norm layers that take BatchNorm's place (GroupNorm, EvoNorm, FRN, BN without running statistics).

    A LayerNorm inside an attention or gating module (global context on a pooled vector) does not: the
    branch's convolutions are still normalised by BatchNorm.
    """
    return sorted({type(m).__name__ for m in _norms(block)
                   if not isinstance(m, nn.LayerNorm)
                   and not (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)})


def _is_batchnorm_block(block: nn.Module) -> bool:
    """The block's convolutions are normalised by BatchNorm with running statistics (the guideline's premise)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in block.modules())
    return has_bn and not _non_bn_norms(block)


def is_family_block(module: nn.Module) -> bool:
    """Whether ``module`` is a block of :data:`MERGE_SLOTS` (converted or not)."""
    return _slot(module) is not None


def family_sites(model: nn.Module) -> Iterator[Tuple[str, nn.Module, Slot]]:
    """The blocks of a model that take a residual dropout, in registration order (forward order for these models).

    Args:
        model: any module.

    Yields:
        ``(qualified_name, block, slot)`` for every block in :data:`MERGE_SLOTS` that has a skip path.
    """
    for name, module in model.named_modules():
        slot = _slot(module)
        if slot is not None and slot.has_skip(module):
            yield name, module, slot


def is_family_model(model: nn.Module) -> bool:
    """Whether ``model`` is of a class :func:`convert_family` knows (converted or not)."""
    return _model_base(model) is not None


def _model_base(model: nn.Module) -> Type[nn.Module] | None:
    for cls in type(model).__mro__:
        if cls in MODEL_CLASSES or cls in FEATURE_CLASSES:
            return cls
    return None


def refusal(model: nn.Module) -> str | None:
    """Why ``convert_family`` cannot place dropout in ``model``, or ``None`` when it can.

    Args:
        model: any module.

    Returns:
        A one-line reason naming the model type or block and what is wrong, or ``None``.
    """
    base = _model_base(model)
    name = f'{type(model).__module__}.{type(model).__name__}'
    if base is None:
        return f'model type {name} is not supported' + (f': {REFUSED[name]}' if name in REFUSED else '')
    if base in MODEL_CLASSES and MODEL_CLASSES[base].pool and no_head_position(model) is None:
        pool = _get(model, MODEL_CLASSES[base].pool)
        if not isinstance(pool, SelectAdaptivePool2d):
            return (f'{name} has no global average pool at {MODEL_CLASSES[base].pool!r} (its head is '
                    f'{type(pool).__name__ if pool is not None else "missing"}): there is no "before pooling" point')
    sites = list(family_sites(model))
    if not sites:
        return f'{name} has no residual block with a skip path: residual dropout has no guideline position'
    for bname, block, _ in sites:
        if not _is_batchnorm_block(block):
            norms = _non_bn_norms(block) or ['no BatchNorm']
            return (f'block {bname!r} ({type(block).__name__}) normalises with {", ".join(norms)}, not BatchNorm '
                    'with running statistics: the guideline is about BatchNorm, so it does not apply')
    for mname, module in model.named_modules():
        if _slot(module) is None and any(hasattr(module, a) for a in ('drop_path', 'drop_path1', 'stochastic_depth')) \
                and not isinstance(module, (DropResMerge, *LAYERNORM_BLOCKS)):
            return (f'block {mname!r} of type {type(module).__module__}.{type(module).__name__} is not in the '
                    'placement table: its merge point is unknown')
    return None


def no_head_position(model: nn.Module) -> str | None:
    """Why ``model``'s head has no guideline position for the head dropout (issue 21 batch B: the CLIP ResNets'
    attention pool), or ``None``. Such a model takes the residual dropout only, with ``drop_rate=0``."""
    check = NO_HEAD_POSITION_B.get(_model_base(model))
    return check(model) if check is not None else None


def _place_head(model: nn.Module, drop_rate: float) -> None:
    base = _model_base(model)
    if base is None or base not in MODEL_CLASSES:
        return
    if no_head_position(model) is not None:  # issue 21 batch B: no head dropout; timm's own one in the head off
        if isinstance(getattr(model.head, 'drop', None), nn.Dropout):
            model.head.drop = nn.Identity()
        return
    head = MODEL_CLASSES[base]
    hook = HEAD_HOOKS.get(base)  # a family whose head needs more than its pool (family_blocks_b, family_blocks_c)
    if hook is not None and not head.pool and not head.trunk:
        hook(model, drop_rate)
        return
    if head.trunk:  # torchvision: the head dropout ends the feature trunk, its classifier Dropout goes
        trunk = _get(model, head.trunk)
        if isinstance(getattr(trunk, 'head_drop', None), ResidualDropout):
            trunk.head_drop.p = drop_rate
        else:
            trunk.add_module('head_drop', ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL))
        classifier = getattr(model, 'classifier', None)
        if isinstance(classifier, nn.Sequential):
            for i, m in enumerate(classifier):
                if isinstance(m, nn.Dropout):
                    classifier[i] = nn.Identity()
        return
    if base is resnet.ResNet:
        model.__class__ = DropResNet
        model.head_drop = ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL)
        model.drop_rate = drop_rate  # informational: DropResNet.forward_head never drops after the pool
        return
    if base in family_blocks_a.FORWARD_HEAD_MODELS:  # issue 21 batch A: pools in forward_head (XCiT, LeViT)
        if isinstance(getattr(model, 'head_drop', None), ResidualDropout):
            model.head_drop.p = drop_rate
        else:
            family_blocks_a.place_forward_head(model, base, ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL))
        return
    pool = _get(model, head.pool)
    if isinstance(pool, DropResSelectAdaptivePool2d):
        pool.head_drop.p = drop_rate
    else:
        pool.__class__ = DropResSelectAdaptivePool2d
        pool.head_drop = ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL)
    # the after-pool dropouts: forward_head's F.dropout(self.drop_rate), a ClassifierHead's drop, a head_drop
    if isinstance(getattr(model, 'drop_rate', None), float):
        model.drop_rate = 0.0
    head_module = getattr(model, 'head', None)
    if isinstance(head_module, nn.Module):  # timm's ClassifierHead (drop), hgnet's head (dropout)
        for attr in ('drop', 'dropout'):
            if isinstance(getattr(head_module, attr, None), nn.Dropout):
                setattr(head_module, attr, nn.Identity())
    if isinstance(getattr(model, 'head_drop', None), nn.Dropout):
        model.head_drop = nn.Identity()
    model.__class__ = _dropres_model_class(type(model))
    if hook is not None:  # issue 21 batch C
        hook(model, drop_rate)


def _reset_classifier(self: nn.Module, *args, **kwargs) -> None:
    """``reset_classifier`` that keeps the head dropout (timm's rebuilds the global pool)."""
    drop = head_dropout(self)
    p = drop.p if drop is not None else 0.0
    super(type(self), self).reset_classifier(*args, **kwargs)
    _place_head(self, p)
    drop = head_dropout(self)
    if drop is not None:  # a fresh module (timm rebuilt the pool) takes the model's mode
        drop.train(self.training)


_MODEL_SUBCLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {}


def _dropres_model_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """``DropRes<Class>``: the model class with a ``reset_classifier`` that keeps the head dropout."""
    if cls in _MODEL_SUBCLASSES.values():
        return cls
    if cls not in _MODEL_SUBCLASSES:
        name = f'DropRes{cls.__name__}'
        sub = type(name, (cls,), {'reset_classifier': _reset_classifier, '__module__': __name__,
                                  '__qualname__': name,
                                  '__doc__': f'timm ``{cls.__name__}`` with head dropout before pooling.'})
        _MODEL_SUBCLASSES[cls] = sub
        globals()[name] = sub  # importable by name, so pickled models load
    return _MODEL_SUBCLASSES[cls]


# issue 21 batch A: the rows of family_blocks_a.py (XCiT, LeViT, EfficientViT-MSRA, TinyViT, EfficientFormer,
# SwiftFormer, SHViT, Next-ViT, Visformer; EfficientViM refused)
FAMILY_BLOCK_TYPES.update(family_blocks_a.BLOCK_TYPES)
MERGE_SLOTS.update({cls: Slot(*row) for cls, row in family_blocks_a.MERGE_SLOTS.items()})
MODEL_CLASSES.update({cls: Head(pool=pool) for cls, pool in family_blocks_a.HEAD_POOLS.items()})
MODEL_CLASSES.update({cls: Head() for cls in family_blocks_a.FORWARD_HEAD_MODELS})
LAYERNORM_BLOCKS += family_blocks_a.LAYERNORM_BLOCKS
REFUSED.update(family_blocks_a.REFUSED)
FEATURE_CLASSES += family_blocks_a.FEATURE_CLASSES

for _cls in MODEL_CLASSES:
    if _cls.__module__.startswith('timm.') and _cls is not resnet.ResNet \
            and _cls not in family_blocks_a.FORWARD_HEAD_MODELS and _cls not in HEAD_PLACERS_B:  # own subclasses
        _dropres_model_class(_cls)


def head_dropout(model: nn.Module) -> ResidualDropout | None:
    """The model's head dropout (before pooling), wherever its family keeps it, or ``None``."""
    for m in model.modules():
        if isinstance(m, ResidualDropout) and m.where == HEAD_BEFORE_POOL:
            return m
    return None


def convert_family(model: nn.Module, *, res_drop_rate: float, drop_rate: float, res_drop_pos: str) -> nn.Module:
    """Place dropout in a model of :data:`MODEL_CLASSES` (or a feature wrapper of one), in place.

    Arguments are validated by the caller (``convert``). Nothing is changed when the model is refused.

    Raises:
        TypeError: the model is refused (:func:`refusal` gives the reason).
        ValueError: ``res_drop_pos`` is ``'before_last_conv'``, which only ResNet-family blocks offer.
    """
    check_family_position(res_drop_pos, type(model).__name__)
    reason = refusal(model)
    if reason is not None:
        raise TypeError(f'convert() cannot place dropout: {reason}')
    headless = no_head_position(model)  # issue 21 batch B
    if headless is not None and drop_rate > 0:
        raise ValueError(f'drop_rate must be 0 for {type(model).__name__} ({headless}), got {drop_rate!r}')
    for _, block, slot in list(family_sites(model)):
        _place_residual(block, slot, res_drop_rate)
    _place_head(model, drop_rate)
    for m in model.modules():
        if isinstance(m, ResidualDropout):
            m.train(model.training)
    return model


def check_family_position(res_drop_pos: str, label: str) -> None:
    """Refuse ``res_drop_pos='before_last_conv'`` for a family model (``label`` names it in the message).

    Raises:
        ValueError: naming the value and the valid choices.
    """
    if res_drop_pos not in (AUTO, AFTER_LAST_BN):
        raise ValueError(f"res_drop_pos must be one of ['auto', 'after_last_bn'] for {label} (its residual "
                         f"dropout sits after the branch's last BatchNorm; 'before_last_conv' exists for ResNet "
                         f'blocks only), got {res_drop_pos!r}')


def _place_residual(block: nn.Module, slot: Slot, p: float) -> None:
    existing = _residual_dropout(block, slot)
    if existing is not None:  # converting again replaces the rate
        existing.p = p
        return
    drop = ResidualDropout(p, where=AFTER_LAST_BN)
    if slot.kind == COMPOSE:
        setattr(block, slot.attr, DropResMerge(drop, getattr(block, slot.attr)))
    elif slot.kind == APPEND:
        getattr(block, slot.attr).add_module('res_drop', drop)
    else:
        block.__class__ = FAMILY_BLOCK_TYPES[type(block)]
        block.res_drop = drop


def _residual_dropout(block: nn.Module, slot: Slot) -> ResidualDropout | None:
    if slot.kind == COMPOSE:
        merge = getattr(block, slot.attr)
        return merge.res_drop if isinstance(merge, DropResMerge) else None
    if slot.kind == APPEND:
        return getattr(getattr(block, slot.attr), 'res_drop', None)
    return getattr(block, 'res_drop', None)


def residual_dropouts(model: nn.Module) -> List[Tuple[str, ResidualDropout]]:
    """``(block name, its residual dropout)`` for every converted block of a family model."""
    return [(name, drop) for name, block, slot in family_sites(model)
            if (drop := _residual_dropout(block, slot)) is not None]
