"""Ablation networks: the hook-placed hazards that never enter the public API, the small-input stem, and
``build_model`` for one (architecture, configuration).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2

from ...models.blocks import block_norms
from ...models.convert import residual_blocks
from ...models.layers import AFTER_LAST_BN, AUTO, BEFORE_LAST_CONV, check_rate
from .configs import AFTER_ADD, BEFORE_EVERY_BN, HEAD_AFTER, HEAD_BEFORE, AblationConfig, get_config
from .spec import ArchSpec

# ----------------------------------------------------------------------------------------------------------
# ablation-only dropout placements (hooks; never part of the public API)
# ----------------------------------------------------------------------------------------------------------

class AblationDropout(nn.Dropout):
    """Inverted dropout applied by an ablation hook, at positions the public API deliberately does not offer.

    It is registered as a child (``ablation_drop``) of the hooked module, so ``train()``/``eval()`` reach it
    and it is active in training only, like any ``nn.Dropout``.

    Args:
        p: drop probability, in [0, 1).
        where: the placement, shown by ``print(model)`` (e.g. ``'before_bn'``, ``'after_add'``).

    Raises:
        ValueError: if ``p`` is not in [0, 1).
    """

    def __init__(self, p: float, where: str) -> None:
        super().__init__(p=check_rate('p', p))
        self.where = where

    def extra_repr(self) -> str:
        return f'p={self.p}, where={self.where} (ablation hook)'


def _drop_first_arg(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return (module.ablation_drop(args[0]), *args[1:])


def _drop_output(module: nn.Module, _args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return module.ablation_drop(output)


def place_before_every_bn(model: nn.Module, p: float) -> List[nn.Module]:
    """Add the "dropout before every BN" hazard: drop the input of every BN inside every residual branch.

    Forward pre-hooks replace only the BN's input: a pre-activation block's shortcut still sees the
    undropped tensor. The hooks stay for the model's lifetime (their handles are not kept).

    Args:
        model: a supported ResNet-family model (see ``residual_blocks``); modified in place.
        p: drop probability, in [0, 1).

    Returns:
        The hooked BN modules, in forward order.

    Raises:
        TypeError: if the model type is not supported.
        ValueError: if ``p`` is not in [0, 1).
    """
    hooked = []
    for _, block in residual_blocks(model):
        for norm in block_norms(block).values():
            norm.ablation_drop = AblationDropout(p, 'before_bn')
            norm.register_forward_pre_hook(_drop_first_arg)
            hooked.append(norm)
    return hooked


def place_after_add(model: nn.Module, p: float) -> List[nn.Module]:
    """Add the "dropout after the addition" hazard: drop every residual block's output with a forward hook.

    The dropout acts after the residual addition (and, in post-activation blocks, after the final ReLU),
    so it reaches the shortcut path and the next block's first BN.

    Args:
        model: a supported ResNet-family model (see ``residual_blocks``); modified in place.
        p: drop probability, in [0, 1).

    Returns:
        The hooked blocks, in forward order.

    Raises:
        TypeError: if the model type is not supported.
        ValueError: if ``p`` is not in [0, 1).
    """
    hooked = []
    for _, block in residual_blocks(model):
        block.ablation_drop = AblationDropout(p, 'after_add')
        block.register_forward_hook(_drop_output)
        hooked.append(block)
    return hooked


def _global_pool(model: nn.Module) -> nn.Module:
    if isinstance(model, ResNet):
        return model.global_pool
    if isinstance(model, ResNetV2):
        return model.head.global_pool
    raise TypeError(f'no global pool known for {type(model).__name__}; supported: ResNet, ResNetV2')


def place_head_after_pool(model: nn.Module, p: float) -> nn.Module:
    """Add head dropout after global pooling (what timm's ``drop_rate`` does), via a hook on the global pool.

    Args:
        model: a timm ``ResNet`` or ``ResNetV2`` (dropres or not); modified in place.
        p: drop probability, in [0, 1).

    Returns:
        The hooked global-pool module.

    Raises:
        TypeError: if the model is not a timm ``ResNet``/``ResNetV2``.
        ValueError: if ``p`` is not in [0, 1).
    """
    pool = _global_pool(model)
    pool.ablation_drop = AblationDropout(p, 'head_after_pool')
    pool.register_forward_hook(_drop_output)
    return pool


def small_input_stem(model: nn.Module, stride: int) -> nn.Module:
    """Adapt an ImageNet stem to 28x28 inputs: first conv at ``stride``, no max-pool (weights unchanged).

    timm's ResNet/ResNetV2 have no option for this (their stems always reduce by 4), and at 28x28 that
    would leave a 1x1 final map on which head dropout before and after pooling are the same thing.

    Args:
        model: a timm ``ResNet`` or ``ResNetV2``; modified in place.
        stride: stride of the stem's first conv, 1 or 2.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if ``stride`` is not 1 or 2.
        TypeError: if the model is not a timm ``ResNet``/``ResNetV2``.
    """
    if stride not in (1, 2):
        raise ValueError(f'stem_stride must be 1 or 2, got {stride!r}')
    if isinstance(model, ResNet):
        first = model.conv1[0] if isinstance(model.conv1, nn.Sequential) else model.conv1
        model.maxpool = nn.Identity()
    elif isinstance(model, ResNetV2):
        first = model.stem.conv if hasattr(model.stem, 'conv') else model.stem.conv1
        model.stem.pool = nn.Identity()
    else:
        raise TypeError(f'small_input_stem supports timm ResNet and ResNetV2, got {type(model).__name__}')
    first.stride = (stride, stride)
    return model


def resolved_position(model: nn.Module) -> Optional[str]:
    """The residual dropout position the model's blocks resolved to (``res_drop_pos``), None without blocks."""
    blocks = list(residual_blocks(model))
    return blocks[0][1].res_drop_pos if blocks else None


def build_model(
        arch: ArchSpec, config: AblationConfig, *, res_drop_rate: float, head_drop_rate: float, num_classes: int = 10,
        in_chans: int = 1,
) -> nn.Module:
    """Build the network of one configuration; every configuration gets identical parameters at a given RNG state.

    Public positions go through ``timm.create_model`` (``res_drop_rate``/``res_drop_pos``, and ``drop_rate``
    for head dropout before pooling); the hazards and head dropout after pooling are added with hooks,
    which add no parameters. ``arch.stem_stride`` adapts the stem with ``small_input_stem``.

    Args:
        arch: the architecture.
        config: the placement.
        res_drop_rate: residual dropout rate (used only if the configuration has residual dropout).
        head_drop_rate: head dropout rate (used only if the configuration has head dropout).
        num_classes: classifier outputs.
        in_chans: input channels.

    Returns:
        The model, with any hooks and the stem adaptation applied.

    Raises:
        ValueError: if a rate is not in [0, 1).
        TypeError: if the architecture is not a supported timm ``ResNet``/``ResNetV2`` for the hooks or
            the stem adaptation.

    Example:
        >>> import torch
        >>> arch = ArchSpec('r18', 'resnet18_dropres', stem_stride=1)
        >>> model = build_model(arch, get_config('default'), res_drop_rate=0.1, head_drop_rate=0.1)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    public_pos = config.residual in (AUTO, AFTER_LAST_BN, BEFORE_LAST_CONV)
    model = timm.create_model(
        arch.model, num_classes=num_classes, in_chans=in_chans,
        drop_rate=head_drop_rate if config.head == HEAD_BEFORE else 0.0,
        res_drop_rate=res_drop_rate if public_pos else 0.0,
        res_drop_pos=config.residual if public_pos else AUTO,
        **arch.model_kwargs)
    if arch.stem_stride is not None:
        small_input_stem(model, arch.stem_stride)
    if config.residual == BEFORE_EVERY_BN:
        place_before_every_bn(model, res_drop_rate)
    elif config.residual == AFTER_ADD:
        place_after_add(model, res_drop_rate)
    if config.head == HEAD_AFTER:
        place_head_after_pool(model, head_drop_rate)
    return model


def configs_for(arch: ArchSpec, names: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Keep the configurations that are distinct networks for ``arch``, and say why any others were left out.

    A pre-activation branch has one candidate position, so 'after_last_bn', 'before_last_conv' and 'residual'
    (the 'auto' position) are the same network there, and training it twice would only waste compute. Of such
    duplicates, 'residual' is kept, else the one named after the position it resolves to, else the first.
    Three probe models of ``arch`` are built to find the resolved positions.

    Args:
        arch: the architecture.
        names: configuration names (see ``get_config``).

    Returns:
        ``(kept, skipped)``: the kept names in the given order, and ``{left-out name: reason}``.

    Raises:
        ValueError: if a configuration name is unknown.
    """
    probe_pos = {}
    for pos in (AUTO, AFTER_LAST_BN, BEFORE_LAST_CONV):
        probe = build_model(arch, AblationConfig('probe', pos, None, ''), res_drop_rate=0.1, head_drop_rate=0.0)
        probe_pos[pos] = resolved_position(probe)
    groups: Dict[Tuple[Any, ...], List[str]] = {}
    for name in names:
        c = get_config(name)
        if c.residual in probe_pos:
            groups.setdefault((probe_pos[c.residual], c.head, c.rate), []).append(name)

    def priority(name: str) -> int:
        base = name.partition('@')[0]
        return 0 if base == 'residual' else 1 if base == probe_pos[get_config(name).residual] else 2

    skipped: Dict[str, str] = {}
    for (pos, _, _), members in groups.items():
        keep = min(members, key=lambda n: (priority(n), members.index(n)))
        for name in members:
            if name != keep:
                skipped[name] = f"same network as '{keep}' here: both resolve to '{pos}'"
    return [n for n in names if n not in skipped], skipped


