"""Train and eval transforms from the model's data config (timm's ``create_transform``), and Mixup/CutMix."""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms as T
from timm.data import Mixup, create_transform, resolve_model_data_config
from timm.data.transforms import str_to_interp_mode

# ----------------------------------------------------------------------------------------------
# transforms and loaders


def channel_stats(model: torch.nn.Module, in_chans: int) -> Dict[str, Tuple[float, ...]]:
    """The model's normalisation ``mean``/``std`` for ``in_chans``-channel data.

    RGB statistics for one-channel data become their mean (one log line, not timm's warning on every call);
    a single value is repeated; any other length mismatch (a ``config.json`` with 2 values for 3 channels)
    is refused, where timm would silently average it.

    Args:
        model: the model whose ``pretrained_cfg`` holds ``mean``/``std`` (ImageNet's when absent).
        in_chans: the data's channel count.

    Returns:
        ``{'mean': (...), 'std': (...)}`` with ``in_chans`` values each, for
        ``resolve_model_data_config(model, args=...)``.

    Raises:
        ValueError: a ``mean``/``std`` whose length is neither 1, ``in_chans``, nor 3 for one-channel data.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    pc = getattr(model, 'pretrained_cfg', None) or {}
    out: Dict[str, Tuple[float, ...]] = {}
    for key, default in (('mean', IMAGENET_DEFAULT_MEAN), ('std', IMAGENET_DEFAULT_STD)):
        value = pc.get(key) or default
        value = tuple(float(v) for v in ((value,) if isinstance(value, (int, float)) else value))
        if len(value) == 1:
            value = value * in_chans
        elif len(value) != in_chans:
            if not (len(value) == 3 and in_chans == 1):
                raise ValueError(f'the model\'s pretrained_cfg {key} has {len(value)} values, but the data has '
                                 f'{in_chans} channel(s): one value per channel is needed')
            value = (float(np.mean(value)),)
        out[key] = value
    return out


def resolve_transforms(
        model: torch.nn.Module,
        in_chans: int,
        *,
        img_size: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        auto_augment: str | None = None,
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        re_prob: float = 0.0,
        scale: Sequence[float] | None = None,
        ratio: Sequence[float] | None = None,
        pad_crop: int = 0,
) -> Tuple[Callable, Callable, Dict[str, Any]]:
    """timm train/eval transforms from the model's data config, adapted to ``in_chans`` and ``img_size``.

    ``pad_crop > 0`` replaces timm's RandomResizedCrop with the CIFAR recipe of He et al. (2016): resize to
    ``img_size``, zero-pad by ``pad_crop`` pixels, take a random ``img_size`` crop, flip with ``hflip``.
    timm's ``create_transform`` has no such mode, so it is composed here from torchvision transforms.

    Args:
        model: the model whose data config (``timm.data.resolve_model_data_config``) is the starting point.
        in_chans: the data's channel count (mean and std are adapted to it).
        img_size: the input resolution (None: the model's).
        crop_pct: the eval center-crop fraction (None: the model's).
        interpolation: the resize interpolation (None: the model's).
        auto_augment: a timm AutoAugment/RandAugment policy.
        hflip: horizontal flip probability.
        color_jitter: color jitter strength.
        re_prob: random erasing probability.
        scale: RandomResizedCrop scale range.
        ratio: RandomResizedCrop aspect ratio range.
        pad_crop: pixels of padding for the CIFAR-style crop (0: timm's RandomResizedCrop).

    Returns:
        ``(train transform, eval transform, data config)``; the data config holds the input size, crop,
        mean/std and interpolation the eval transform uses.
    """
    cfg = resolve_model_data_config(model, args=channel_stats(model, in_chans))
    if img_size:
        cfg['input_size'] = (in_chans, img_size, img_size)
    else:
        cfg['input_size'] = (in_chans, *cfg['input_size'][1:])
    if crop_pct is not None:
        cfg['crop_pct'] = crop_pct
    if interpolation:
        cfg['interpolation'] = interpolation
    if len(cfg['mean']) != in_chans:  # grayscale data: one channel, the mean of the RGB statistics
        cfg['mean'] = tuple([float(np.mean(cfg['mean']))] * in_chans)
        cfg['std'] = tuple([float(np.mean(cfg['std']))] * in_chans)
    common = dict(input_size=cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'])
    train_tf = create_transform(
        **common, is_training=True, auto_augment=auto_augment or None, hflip=hflip, color_jitter=color_jitter,
        re_prob=re_prob, scale=tuple(scale) if scale else None, ratio=tuple(ratio) if ratio else None)
    if pad_crop > 0:
        size = cfg['input_size'][1:]
        train_tf = T.Compose([
            T.Resize(size, interpolation=str_to_interp_mode(cfg['interpolation'])),
            T.RandomCrop(size, padding=pad_crop), T.RandomHorizontalFlip(hflip), T.ToTensor(),
            T.Normalize(cfg['mean'], cfg['std'])])
    eval_tf = create_transform(**common, is_training=False, crop_pct=cfg['crop_pct'],
                               crop_mode=cfg.get('crop_mode'))
    return train_tf, eval_tf, cfg


def create_mixup(
        mixup: float, cutmix: float, label_smoothing: float, num_classes: int,
        mixup_prob: float = 1.0, switch_prob: float = 0.5,
) -> Mixup | None:
    """timm's batch-wise Mixup/CutMix (which also applies label smoothing).

    Args:
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        label_smoothing: the smoothing of the mixed targets.
        num_classes: the class count.
        mixup_prob: the probability of mixing a batch.
        switch_prob: the probability of CutMix instead of mixup when both are on.

    Returns:
        timm's ``Mixup``, or None when both alphas are 0.
    """
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=switch_prob,
                 label_smoothing=label_smoothing, num_classes=num_classes)


