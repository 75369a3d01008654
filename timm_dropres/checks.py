"""Values checked where they enter: one line that names the option or key, before anything is built.

Each check here stands in front of a library that would otherwise fail late or badly on the same value:
timm's scheduler factory returns None for ``none`` (an ``AttributeError`` at the first step), its transforms
``assert`` on an unknown ``--aa`` and raise ``KeyError`` for an unknown interpolation, its Mixup ``assert``\\ s
an even batch, a 100000-pixel image size is a ``MemoryError`` in the first transform, a damaged safetensors
file is a ``SafetensorError`` traceback, and a ``config.json`` whose ``mean`` has the wrong length is quietly
averaged. The valid choices are read from timm itself (its public functions), never copied here.

Values shown in messages go through :func:`cut`, so a 394-byte YAML anchor bomb is never expanded into a
351 MB error message.

A bad option is an :class:`~timm_dropres.errors.OptionError` naming it by its field name (``img_size``); each
front end renders its own name for it (the CLIs: ``--img-size``). A bad ``config.json`` key is a ``ValueError``
naming the file and the key. The checks of values alone run in the config classes' ``__post_init__``; the
ones that read files (:func:`check_safetensors_file`, :func:`check_output_outside_data`) run where the file
system is checked, in ``training.build.resolve_model``.
"""
from __future__ import annotations

import math
import os
import reprlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from .errors import OptionError

__all__ = ['MAX_IMAGE_SIZE', 'cut', 'check_image_size', 'interpolation_names', 'check_interpolation',
           'check_scheduler', 'check_auto_augment', 'check_mixup_batch', 'check_safetensors_file',
           'check_folder_config', 'check_output_outside_data', 'check_finetune_values', 'check_validate_values']

#: the largest image side accepted anywhere (--img-size, --pad-crop, a config.json input_size): 8192 px is a
#: 805 MB float32 RGB image, beyond any classifier's input; 100000 px (a typo) would be 120 GB
MAX_IMAGE_SIZE = 8192

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxlevel = 60, 60, 6, 6, 6, 3


def cut(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without ever building the whole repr.

    ``reprlib`` looks at a few elements per level and a few levels deep, so even a structure of a billion
    shared elements (a YAML anchor bomb) is shown in microseconds.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


def _said(e: BaseException, limit: int = 200) -> str:
    """The first line of what an exception said, at most ``limit`` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + '...'


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_image_size(option: str, value: Any, *, allow_zero: bool = False) -> None:
    """An image side in pixels: an integer in [1, :data:`MAX_IMAGE_SIZE`] (or 0 with ``allow_zero``).

    Args:
        option: the option's field name (``img_size``, ``pad_crop``).
        value: its value.
        allow_zero: 0 is valid too (``pad_crop``: no padding).

    Raises:
        OptionError: ``<option> must be ...``.
    """
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= MAX_IMAGE_SIZE:
        raise OptionError('{0} must be a whole number of pixels in [{lo}, {hi}], got {value}', option, lo=lo,
                          hi=MAX_IMAGE_SIZE, value=cut(value))


def interpolation_names() -> List[str]:
    """The interpolation names timm's transforms accept (``timm.data.transforms.interp_mode_to_str``)."""
    from timm.data.transforms import interp_mode_to_str
    from torchvision.transforms import InterpolationMode

    names = []
    for mode in InterpolationMode:
        try:
            names.append(interp_mode_to_str(mode))
        except KeyError:  # modes timm has no name for
            continue
    return names


def check_interpolation(option: str, name: str) -> None:
    """Raise :class:`OptionError` naming ``option`` and timm's choices when ``name`` is not one of them."""
    valid = interpolation_names()
    if name not in valid:
        raise OptionError('{0} {value} is not an interpolation timm knows; valid: {valid}', option, value=cut(name),
                          valid=valid)


#: the scheduler names timm's create_scheduler_v2 documents; the ones that build under the run's settings are
#: listed in the error (timm itself raises for any other name)
_TIMM_SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant', 'plateau')


def _build_scheduler(sched: str, epochs: int, warmup_epochs: float, decay_milestones: Sequence[int]) -> Any:
    import torch
    from timm.scheduler import create_scheduler_v2

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return create_scheduler_v2(opt, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs,
                               decay_milestones=list(decay_milestones) or [max(1, epochs // 2)],
                               step_on_epochs=False, updates_per_epoch=10)[0]


def check_scheduler(sched: str, *, epochs: int, warmup_epochs: float, decay_milestones: Sequence[int] = ()) -> None:
    """``sched``: a scheduler timm builds for a per-update schedule with these settings.

    The check builds it on a one-parameter optimizer, so every rule of timm's factory applies (an unknown
    name, ``plateau``'s per-epoch stepping, ``rsqrt`` without warmup), and ``none`` (no scheduler at all) is
    refused: the trainer steps a schedule every update; ``constant`` keeps the learning rate fixed.

    Raises:
        OptionError: ``sched <name>: <why>; valid with these settings: [...]``.
    """
    def builds(name: str) -> Any:
        try:
            return _build_scheduler(name, epochs, warmup_epochs, decay_milestones) is not None
        except (ValueError, AssertionError, TypeError) as e:
            return e

    ok = builds(sched)
    if ok is True:
        return
    valid = [n for n in _TIMM_SCHEDULERS if builds(n) is True]
    why = ('it is no scheduler: the trainer steps the learning rate every update; {0} constant keeps it fixed'
           if ok is False else 'timm refuses it ({said})')
    raise OptionError('{0} {value}: ' + why + '; valid with these settings: {valid}', 'sched', value=cut(sched),
                      said='' if ok is False else _said(ok), valid=valid)


def _aa_policies() -> List[str]:
    from timm.data.auto_augment import auto_augment_policy
    names = []
    for name in ('original', 'originalr', 'v0', 'v0r', '3a'):
        try:
            auto_augment_policy(name)
            names.append(name)
        except (AssertionError, KeyError, ValueError):
            continue
    return names


def check_auto_augment(aa: str) -> None:
    """``aa``: a policy string timm's ``create_transform`` builds (RandAugment, AugMix or an AutoAugment policy).

    Raises:
        OptionError: naming ``aa``, what timm said, and the forms timm accepts.
    """
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=aa)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise OptionError('{0} {value} is not an augmentation policy timm builds ({said}); valid: rand-<options> '
                          '(e.g. rand-m9-mstd0.5), augmix-<options> (e.g. augmix-m5-w3), or one of {policies}', 'aa',
                          value=cut(aa), said=_said(e), policies=_aa_policies()) from None


def check_mixup_batch(mixup: float, cutmix: float, batch_size: int) -> None:
    """timm's Mixup/CutMix pair each image with another of the batch, so the batch must be even."""
    if (mixup > 0 or cutmix > 0) and batch_size % 2:
        raise OptionError('{0}/{1} need an even {2} (timm\'s Mixup pairs the images of a batch, and every batch is '
                          'this size); got {2} {value}', 'mixup', 'cutmix', 'batch_size', value=batch_size)


def check_safetensors_file(path: str | os.PathLike, option: str, given: str = '') -> None:
    """Open ``path`` as safetensors (header and offsets only, no tensor read): a damaged file is named now.

    Args:
        path: the file.
        option: the option it comes from, by field name (``pretrained_file``, ``model``).
        given: the option's value when it is not ``path`` itself (``local-dir:X`` for ``model``).

    Raises:
        OptionError: the file is empty, not safetensors, or its header lies about the data.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework='pt') as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        real = f' (a link to {os.path.realpath(path)})' if os.path.islink(path) else ''
        raise OptionError('{0}{given}: {path}{real} is not a readable safetensors file ({said}); it is damaged or '
                          'not a weights file', option, given=f' {given}' if given else '', path=path, real=real,
                          said=_said(e)) from None


def _check_pretrained_cfg(pc: Mapping[str, Any], where: str, chans: int) -> None:
    size = pc.get('input_size')
    if size is not None:
        if not (isinstance(size, list) and len(size) == 3 and all(
                isinstance(s, int) and not isinstance(s, bool) for s in size)):
            raise ValueError(f'{where}.input_size must be [channels, height, width], got {cut(size)}')
        if not 1 <= size[0] <= 64 or not all(1 <= s <= MAX_IMAGE_SIZE for s in size[1:]):
            raise ValueError(f'{where}.input_size {size}: channels must be in [1, 64] and height and width in '
                             f'[1, {MAX_IMAGE_SIZE}]')
        chans = size[0]
    for key in ('mean', 'std'):
        v = pc.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and all(_is_number(x) for x in v)) or len(v) != chans or (
                key == 'std' and not all(x > 0 for x in v)):
            want = 'positive numbers' if key == 'std' else 'numbers'
            raise ValueError(f'{where}.{key} must be a list of {chans} {want}, one per input channel, got {cut(v)}')
    crop = pc.get('crop_pct')
    if crop is not None and not (_is_number(crop) and 0 < crop <= 1):
        raise ValueError(f'{where}.crop_pct must be a number in (0, 1], got {cut(crop)}')
    interp = pc.get('interpolation')
    if interp is not None and interp not in interpolation_names():
        raise ValueError(f'{where}.interpolation {cut(interp)} is not one timm knows; valid: {interpolation_names()}')


def check_folder_config(config: Any, path: str | os.PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a saved model folder, checked key by key before timm reads it.

    Args:
        config: the decoded JSON.
        path: the file (for the message).

    Returns:
        ``config``.

    Raises:
        ValueError: ``<path>: <key> must be ..., got ...`` for the first bad key.
    """
    if not isinstance(config, dict):
        raise ValueError(f'{path} must hold a JSON object (architecture, num_classes, ...), got a JSON '
                         f'{type(config).__name__}')
    arch = config.get('architecture')
    if arch is not None and not isinstance(arch, str):
        raise ValueError(f'{path}: architecture must be a timm model name, got {cut(arch)}')
    n = config.get('num_classes')
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f'{path}: num_classes must be a whole number >= 0, got {cut(n)}')
    names = config.get('label_names')
    if names is not None:
        if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
            raise ValueError(f'{path}: label_names must be a list of strings, got {cut(names)}')
        if isinstance(n, int) and n and len(names) != n:
            raise ValueError(f'{path}: label_names has {len(names)} names for num_classes {n}')
    args = config.get('model_args')
    if args is not None and not isinstance(args, dict):
        raise ValueError(f'{path}: model_args must be an object of keyword arguments, got {cut(args)}')
    chans = (args or {}).get('in_chans', 3)
    pc = config.get('pretrained_cfg')
    if pc is not None:
        if not isinstance(pc, dict):
            raise ValueError(f'{path}: pretrained_cfg must be an object, got {cut(pc)}')
        _check_pretrained_cfg(pc, f'{path}: pretrained_cfg', chans if isinstance(chans, int) else 3)
    return config


def check_output_outside_data(output_dir: str | os.PathLike, dataset: str | os.PathLike) -> None:
    """Refuse an ``output_dir`` inside an ImageFolder ``dataset``: its folders would be read as classes.

    Args:
        output_dir: the run folder.
        dataset: the ImageFolder root.

    Raises:
        OptionError: naming both options and paths.
    """
    out, data = Path(os.path.realpath(output_dir)), Path(os.path.realpath(dataset))
    if out == data or data in out.parents:
        raise OptionError('{0} {out} is inside {1} {data}: the run\'s folders would be read as classes or images by '
                          'every later run on this dataset (and by this run\'s resume); choose an {0} outside the '
                          'dataset', 'output_dir', 'dataset', out=output_dir, data=dataset)


def _check_range_pair(option: str, pair: Sequence[float] | None, hi_limit: float | None) -> None:
    if pair is None:
        return
    lo, hi = pair
    top = f' <= {hi_limit:g}' if hi_limit is not None else ''
    if not (0 < lo <= hi and (hi_limit is None or hi <= hi_limit)):
        raise OptionError('{0} must be two numbers with 0 < low <= high{top}, got {value}', option, top=top,
                          value=cut(list(pair)))


def _check_crop_pct(crop_pct: float | None) -> None:
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise OptionError('{0} is the fraction of the resized image the centre crop keeps: it must be in (0, 1], '
                          'got {value}', 'crop_pct', value=crop_pct)


def check_finetune_values(cfg: Any) -> None:
    """The value checks of this module for a :class:`~timm_dropres.training.config.FinetuneConfig` (on creation).

    Values only: nothing here reads a file (the weights files and the output folder are checked by
    ``training.build.resolve_model``).

    Args:
        cfg: the options.

    Raises:
        OptionError: the first bad value, naming its option.
    """
    if cfg.img_size is not None:
        check_image_size('img_size', cfg.img_size)
    check_image_size('pad_crop', cfg.pad_crop, allow_zero=True)
    if cfg.img_size is not None and cfg.pad_crop > cfg.img_size:
        raise OptionError('{0} {pad} pads more than the whole {1} {size}: the random crop would be mostly padding '
                          '(CIFAR uses 4 at 32 px)', 'pad_crop', 'img_size', pad=cfg.pad_crop, size=cfg.img_size)
    _check_crop_pct(cfg.crop_pct)
    _check_range_pair('scale', cfg.scale, 1.0)
    _check_range_pair('ratio', cfg.ratio, None)
    if not 0 <= cfg.momentum < 1:
        raise OptionError('{0} must be in [0, 1) (at 1 or above every step adds more than the last: the weights '
                          'diverge), got {value}', 'momentum', value=cfg.momentum)
    if cfg.interpolation:
        check_interpolation('interpolation', cfg.interpolation)
    if cfg.aa:
        check_auto_augment(cfg.aa)
    check_mixup_batch(cfg.mixup, cfg.cutmix, cfg.batch_size)
    check_scheduler(cfg.sched, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                    decay_milestones=cfg.decay_milestones)


def check_validate_values(cfg: Any) -> None:
    """The value checks of this module for a :class:`~timm_dropres.training.config.ValidateConfig`.

    Args:
        cfg: the options.

    Raises:
        OptionError: the first bad value, naming its option.
    """
    if cfg.img_size is not None:
        check_image_size('img_size', cfg.img_size)
    _check_crop_pct(cfg.crop_pct)
