"""Retrofit dropout into an existing timm or torchvision BatchNorm residual CNN, in place, keeping its weights.

``convert`` is the single code path for placing dropout: the registered ``*_dropres`` models are
built as their base architecture and then converted, so ``create_model('resnet50_dropres')`` and
``convert(create_model('resnet50'))`` are the same network by construction. The ResNet family (timm
``ResNet``/``ResNetV2`` with resnet.py/resnetv2.py blocks, torchvision ``ResNet``) is handled here; every other
family (EfficientNet, MobileNet, RegNet, ByobNet, CSPNet, DLA, HRNet, Res2Net, ResNeSt, ...) by ``families.py``.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch.nn as nn
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2

from . import families
from .blocks import BLOCK_TYPES, PRE_ACT_BLOCKS, block_norms, is_supported_norm
from .heads import MODEL_TYPES
from .layers import (
    AFTER_LAST_BN,
    AUTO,
    BEFORE_LAST_CONV,
    DEFAULT_HEAD_DROP_RATE,
    DEFAULT_POST_ACT_POS,
    DEFAULT_RES_DROP_RATE,
    HEAD_BEFORE_POOL,
    ResidualDropout,
    check_dropout_args,
    check_position,
)

__all__ = ['convert', 'resolve_position', 'dropout_args', 'residual_blocks']


def resolve_position(block_cls: type, res_drop_pos: str) -> str:
    """Map a requested ``res_drop_pos`` to the concrete position used in blocks of ``block_cls``.

    Pre-activation branches end in norm + act -> conv, so "after the last BN" and "before the last
    conv" are the same point; every value resolves to ``before_last_conv`` there. Post-activation
    blocks keep an explicit position, and ``'auto'`` becomes ``DEFAULT_POST_ACT_POS``
    (``after_last_bn``).

    Args:
        block_cls: a supported residual block class (timm, torchvision, or its dropres subclass).
        res_drop_pos: ``'auto'``, ``'after_last_bn'`` or ``'before_last_conv'``.

    Returns:
        ``'after_last_bn'`` or ``'before_last_conv'``.

    Raises:
        ValueError: if ``res_drop_pos`` is not a known position.

    Example:
        >>> from timm.models.resnet import BasicBlock
        >>> from timm.models.resnetv2 import PreActBasic
        >>> resolve_position(BasicBlock, 'auto'), resolve_position(PreActBasic, 'after_last_bn')
        ('after_last_bn', 'before_last_conv')
    """
    check_position(res_drop_pos)
    if block_cls in PRE_ACT_BLOCKS or BLOCK_TYPES.get(block_cls) in PRE_ACT_BLOCKS:
        return BEFORE_LAST_CONV
    return DEFAULT_POST_ACT_POS if res_drop_pos == AUTO else res_drop_pos


def _model_kind(model: nn.Module) -> type[nn.Module]:
    for base, dropres in MODEL_TYPES.items():
        if type(model) in (base, dropres):
            return base
    supported = ', '.join(dict.fromkeys(f'{c.__module__}.{c.__name__}'  # each once (timm's ResNet is in both)
                                        for c in [*MODEL_TYPES, *families.MODEL_CLASSES]))
    name = f'{type(model).__module__}.{type(model).__name__}'
    why = f' ({families.REFUSED[name]})' if name in families.REFUSED else ''
    raise TypeError(f'convert() does not support model type {name}{why}; supported: {supported}')


def _is_resnet_family(model: nn.Module) -> bool:
    """A ResNet-family model whose blocks this module places (else ``families.py`` does, or nobody)."""
    if not any(type(model) in (base, dropres) for base, dropres in MODEL_TYPES.items()):
        return False
    if _model_kind(model) is not ResNet:
        return True
    # timm's ResNet class also builds Res2Net, SKNet and ResNeSt, whose blocks families.py places; any other
    # block (an unknown one included) stays here, where it is refused
    ours = set(BLOCK_TYPES) | set(BLOCK_TYPES.values())
    blocks = [b for n in ('layer1', 'layer2', 'layer3', 'layer4') for b in getattr(model, n)]
    return not all(families.is_family_block(b) and type(b) not in ours for b in blocks)


def residual_blocks(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Iterate over the residual blocks of a supported model, in forward order.

    Args:
        model: a timm ``ResNet``/``ResNetV2`` or torchvision ``ResNet``, converted or not.

    Yields:
        ``(qualified_name, block)``, e.g. ``('layer1.0', block)`` or ``('stages.0.blocks.0', block)``. For the
        other families (``families.py``): the blocks that have a skip path, the ones that take a dropout.

    Raises:
        TypeError: if the model type is not supported (raised at the first ``next()``).

    Example:
        >>> import timm
        >>> [name for name, _ in residual_blocks(timm.create_model('resnet18'))][:3]
        ['layer1.0', 'layer1.1', 'layer2.0']
    """
    if not _is_resnet_family(model) and families.is_family_model(model):
        for name, block, _ in families.family_sites(model):
            yield name, block
        return
    kind = _model_kind(model)
    if kind is ResNetV2:
        containers = [(f'stages.{i}.blocks', stage.blocks) for i, stage in enumerate(model.stages)]
    else:
        containers = [(n, getattr(model, n)) for n in ('layer1', 'layer2', 'layer3', 'layer4')]
    for prefix, container in containers:
        for idx, block in enumerate(container):
            yield f'{prefix}.{idx}', block


def _check_block(model: nn.Module, name: str, block: nn.Module) -> type[nn.Module]:
    cls = type(block)
    target = BLOCK_TYPES.get(cls) or (cls if cls in BLOCK_TYPES.values() else None)
    if target is None:
        raise TypeError(
            f'convert() cannot place dropout in {type(model).__name__} block {name!r} of type '
            f'{cls.__module__}.{cls.__name__}; supported blocks: {sorted(c.__name__ for c in BLOCK_TYPES)}')
    for norm_name, norm in block_norms(block).items():
        if not is_supported_norm(block, norm):
            raise TypeError(
                f'convert() cannot place dropout in {type(model).__name__} block {name!r}: its {norm_name} is '
                f'{type(norm).__name__}, not BatchNorm. The guideline is about BatchNorm running statistics, '
                'so GroupNorm/FRN/EvoNorm (e.g. BiT) models are not supported')
    return target


def convert(
        model: nn.Module,
        *,
        res_drop_rate: float = DEFAULT_RES_DROP_RATE,
        drop_rate: float = DEFAULT_HEAD_DROP_RATE,
        res_drop_pos: str = AUTO,
) -> nn.Module:
    """Place dropout in a timm or torchvision BatchNorm residual CNN, in place, and return it.

    Supported: timm ``ResNet``/``ResNetV2`` and torchvision ``ResNet`` (below), and the families of
    ``families.MODEL_CLASSES`` (timm EfficientNet/MobileNetV3/RegNet/ByobNet/CspNet/DLA/HRNet/RexNet/GhostNet/...,
    Res2Net/SKNet/ResNeSt, torchvision EfficientNet/MobileNetV2/V3/RegNet), whose blocks all end their branch
    in BatchNorm: there the residual dropout goes after the last BN (and SE), before the merge, and
    ``res_drop_pos`` may be ``'auto'`` or ``'after_last_bn'``; blocks without a skip path get none.

    One ``ResidualDropout`` per residual block at ``res_drop_pos`` (see ``resolve_position``) and one
    on the final feature map before global pooling; any after-pool dropout is removed. Weights, state
    dict keys and eval outputs are unchanged, so a pretrained model keeps its accuracy in eval mode.
    Converting again replaces the rates and position, so the model never holds more than one dropout
    per block. The classes of the model and its blocks are switched to their dropres subclasses.

    Args:
        model: the model to convert; its train/eval mode carries over to the new dropout modules.
        res_drop_rate: drop probability of the residual-branch dropouts, in [0, 1).
        drop_rate: drop probability of the head dropout (on the feature map, before pooling), in [0, 1).
        res_drop_pos: ``'auto'`` (the guideline position for each block form), ``'after_last_bn'`` or
            ``'before_last_conv'``.

    Returns:
        ``model`` itself, converted.

    Raises:
        TypeError: the model or one of its blocks is not a supported type, a block's norm is not BatchNorm
            (GroupNorm/FRN/EvoNorm models), the model has no residual merge or no global average pool; the
            message gives the reason. Nothing is modified in that case.
        ValueError: a rate outside [0, 1) or an unknown position; ``drop_rate > 0`` for a model whose head has no
            guideline position (the CLIP ResNets' attention pool: ``families.no_head_position``).

    Example:
        >>> import timm
        >>> model = convert(timm.create_model('resnet50', pretrained=True), res_drop_rate=0.1)  # doctest: +SKIP
        >>> model = convert(timm.create_model('resnet18'), res_drop_rate=0.1, drop_rate=0.2)
        >>> type(model).__name__, model.layer1[0].res_drop.p, model.head_drop.p
        ('DropResNet', 0.1, 0.2)
    """
    drop_rate, res_drop_rate, res_drop_pos = check_dropout_args(drop_rate, res_drop_rate, res_drop_pos)
    if not _is_resnet_family(model) and families.is_family_model(model):
        return families.convert_family(model, res_drop_rate=res_drop_rate, drop_rate=drop_rate,
                                       res_drop_pos=res_drop_pos)
    kind = _model_kind(model)
    # validate every block before touching anything, so a refusal leaves the model as it was
    plan = [(block, _check_block(model, name, block)) for name, block in residual_blocks(model)]
    for block, target in plan:
        pos = resolve_position(target, res_drop_pos)
        block.__class__ = target
        block.res_drop_pos = pos
        block.res_drop = ResidualDropout(res_drop_rate, where=pos)
        block.res_drop.train(block.training)

    model.__class__ = MODEL_TYPES[kind]
    model.head_drop = ResidualDropout(drop_rate, where=HEAD_BEFORE_POOL)
    model.head_drop.train(model.training)
    if kind is ResNet:
        model.drop_rate = drop_rate  # informational; DropResNet.forward_head never drops after the pool
    elif kind is ResNetV2:
        model.drop_rate = drop_rate
        model.head.drop = nn.Identity()  # the ClassifierHead's after-pool dropout
    return model


def dropout_args(model: nn.Module) -> dict:
    """Return the ``model_args`` that rebuild this model's dropout, for ``timm.models.save_for_hf``.

    timm drops ``*drop_rate`` keys from saved ``model_args`` by default, so exporters must pass these
    explicitly (``save_for_hf(model, ..., model_args=dropout_args(model))``) for ``config.json`` to
    rebuild the same placement.

    Args:
        model: a converted (or ``*_dropres``) model with one residual rate and position for all blocks.

    Returns:
        ``{'drop_rate': ..., 'res_drop_rate': ..., 'res_drop_pos': ...}``, the position as resolved for
        the model's blocks (never ``'auto'``).

    Raises:
        TypeError: if the model type is not supported.
        ValueError: if the model carries no dropres dropout, or its blocks have different rates or
            positions.

    Example:
        >>> import timm
        >>> dropout_args(convert(timm.create_model('resnet18'), res_drop_rate=0.1, drop_rate=0.1))
        {'drop_rate': 0.1, 'res_drop_rate': 0.1, 'res_drop_pos': 'after_last_bn'}
    """
    if not _is_resnet_family(model) and families.is_family_model(model):
        head = families.head_dropout(model)
        drops = families.residual_dropouts(model)
        if head is None and not drops:
            raise ValueError(f'{type(model).__name__} carries no dropres dropout; call convert() first')
        rates = {d.p for _, d in drops}
        if len(rates) > 1:
            raise ValueError(f'model has mixed residual dropout settings (rates {rates})')
        return dict(drop_rate=head.p if head is not None else 0.0,
                    res_drop_rate=rates.pop() if rates else 0.0, res_drop_pos=AFTER_LAST_BN)
    _model_kind(model)
    if not hasattr(model, 'head_drop'):
        raise ValueError(f'{type(model).__name__} carries no dropres dropout; call convert() first')
    positions = {block.res_drop_pos for _, block in residual_blocks(model)}
    rates = {block.res_drop.p for _, block in residual_blocks(model)}
    if len(rates) != 1 or len(positions) != 1:
        raise ValueError(f'model has mixed residual dropout settings (rates {rates}, positions {positions})')
    pos = positions.pop()
    return dict(drop_rate=model.head_drop.p, res_drop_rate=rates.pop(), res_drop_pos=pos)

