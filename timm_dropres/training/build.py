"""Model building for fine-tuning and validation: name checks, dropout kwargs, ``timm.create_model``.

Everything here goes through timm's public API (``is_model``, ``list_models``, ``create_model`` with
``pretrained_cfg_overlay``), so any timm model works; the ``*_dropres`` ones add the dropout flags.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Tuple

import timm
import torch.nn as nn
from safetensors import SafetensorError

from ..checks import check_safetensors_file
from ..hub.export import read_folder_config
from ..models.convert import dropout_args
from ..models.layers import check_dropout_args, check_rate

if TYPE_CHECKING:
    from .config import FinetuneConfig

__all__ = ['check_model_name', 'check_compile_backend', 'dropout_kwargs', 'in_chans_of', 'build_model',
           'model_identity', 'weights_origin', 'checkpoint_file']

_logger = logging.getLogger(__name__)


def _architecture(name: str) -> str | None:
    """The registered architecture behind a model name, or None when it is only known after download."""
    if name.startswith('local-dir:'):
        return read_folder_config(name[len('local-dir:'):]).get('architecture')
    if name.startswith(('hf-hub:', 'hf_hub:', 'timm/')):
        return None
    return name.split('.', 1)[0]


def check_model_name(name: str) -> None:
    """Fail early with a clear message for an unknown model name or a missing local-dir folder."""
    if name.startswith('local-dir:'):
        folder = Path(name[len('local-dir:'):])
        if not folder.is_dir():
            raise FileNotFoundError(f'model folder {folder} does not exist (from --model {name})')
        arch = read_folder_config(folder).get('architecture')
        if not isinstance(arch, str) or not timm.is_model(arch):
            known = timm.list_models('*_dropres')[:3]
            raise ValueError(f'{folder}/config.json: architecture {arch!r} is not a registered timm model, so the '
                             f'folder cannot be loaded; expected a timm name, e.g. a dropres one like {known}')
        if (folder / 'model.safetensors').exists():  # a damaged file is named now, not in a traceback later
            check_safetensors_file(folder / 'model.safetensors', f'--model {name}')
        return
    arch = _architecture(name)
    if arch is None:
        return
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f'; did you mean one of {close}?' if close else '; see timm.list_models() for the names'
        raise ValueError(f'unknown model {name!r}{hint}')
    if '.' in name:  # a pretrained tag: timm raises a bare RuntimeError for an unknown one, at creation
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = [m.split('.', 1)[1] for m in timm.list_models(arch, include_tags=True) if '.' in m]
            raise ValueError(f'unknown pretrained tag {name.split(".", 1)[1]!r} for {arch} (from --model '
                             f'{name}); valid tags: {tags or "none (give the name without a tag)"}') from None


def check_compile_backend(backend: str) -> str:
    """``backend`` if ``torch.compile`` knows it (``--torchcompile``), else ``ValueError`` listing the valid ones."""
    import torch

    valid = torch.compiler.list_backends(exclude_tags=())
    if backend not in valid:
        raise ValueError(f'--torchcompile {backend!r} is not a torch.compile backend; valid: {valid}')
    return backend


def dropout_kwargs(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Dropout kwargs for ``create_model``, validated; dropres-only flags are refused for other models."""
    values = check_dropout_args(cfg.drop_rate, cfg.res_drop_rate, cfg.res_drop_pos)
    kwargs: Dict[str, Any] = {k: v for k, v in zip(('drop_rate', 'res_drop_rate', 'res_drop_pos'), values,
                                                   strict=True) if v is not None}
    for name in ('drop_path_rate', 'drop_block_rate'):  # timm's --drop-path / --drop-block, for any timm model
        if getattr(cfg, name) is not None:
            kwargs[name] = check_rate(name, getattr(cfg, name))
    arch = _architecture(cfg.model)
    if arch is not None and not arch.endswith('_dropres'):
        given = [f'--{k.replace("_", "-")}' for k in ('res_drop_rate', 'res_drop_pos') if k in kwargs]
        if given:
            twin = f'{arch}_dropres'
            fix = (f'use --model {twin} (same weights, guideline dropout)' if timm.is_model(twin)
                   else 'only ResNet/ResNetV2 families have *_dropres variants (timm_dropres.registered_models())')
            raise ValueError(f'{" and ".join(given)} need a *_dropres model, but {cfg.model!r} is not one; {fix}')
    return kwargs


def in_chans_of(model: nn.Module) -> int:
    """Input channels of the first convolution: what the model expects of the data."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def build_model(cfg: FinetuneConfig, num_classes: int, in_chans: int) -> Tuple[nn.Module, Dict[str, Any]]:
    """``timm.create_model`` for the data's classes and channels; returns the model and its kwargs."""
    check_model_name(cfg.model)
    kwargs = dict(dropout_kwargs(cfg), num_classes=num_classes, in_chans=in_chans)
    clash = sorted(set(cfg.model_kwargs) & (set(kwargs) | {'pretrained', 'pretrained_cfg_overlay'}))
    if clash:
        raise ValueError(f'--model-kwargs {clash} are set by the trainer or by their own flags (--drop-rate, '
                         '--res-drop-rate, --res-drop-pos, --drop-path-rate, --drop-block-rate; classes and channels '
                         'come from the data)')
    kwargs.update(cfg.model_kwargs)
    pretrained = cfg.pretrained or cfg.pretrained_file is not None or cfg.model.startswith('local-dir:')
    if cfg.pretrained_file is not None:
        if not Path(cfg.pretrained_file).is_file():
            raise FileNotFoundError(f'--pretrained-file {cfg.pretrained_file} does not exist')
        kwargs['pretrained_cfg_overlay'] = dict(file=str(cfg.pretrained_file))
    try:
        model = timm.create_model(cfg.model, pretrained=pretrained, **kwargs)
    except TypeError as e:  # e.g. hf-hub: model that is not a dropres one, given dropres flags
        raise ValueError(f'{cfg.model!r} does not accept {sorted(kwargs)}: {e}') from e
    if cfg.initial_checkpoint is not None:
        _load_initial_checkpoint(model, cfg.initial_checkpoint)
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, AssertionError, NotImplementedError) as e:
            raise ValueError(f'--grad-checkpointing: {cfg.model} does not support gradient checkpointing ({e})') from e
    if pretrained:
        pc = model.pretrained_cfg or {}
        src_classes = pc.get('num_classes')
        if cfg.model.startswith('local-dir:'):
            src_classes = read_folder_config(cfg.model[len('local-dir:'):]).get('num_classes', src_classes)
        if src_classes and src_classes != num_classes:
            _logger.info('Pretrained %s has a %d-class classifier; replaced it with a new, randomly initialised '
                         '%d-class classifier for this dataset', cfg.model, src_classes, num_classes)
        src_chans = (pc.get('input_size') or (3,))[0]
        if src_chans != in_chans:
            _logger.info('Pretrained first conv takes %d channels; timm adapted it to %d (adapt_input_conv)',
                         src_chans, in_chans)
    if 'drop_rate' in kwargs and not hasattr(model, 'head_drop'):
        _logger.info("%s is not a dropres model: --drop-rate %.3g is timm's own dropout after global pooling",
                     cfg.model, kwargs['drop_rate'])
    kwargs.pop('pretrained_cfg_overlay', None)
    return model, kwargs


def checkpoint_file(path: str | Path) -> Path:
    """The weights file of ``--initial-checkpoint``: the file itself, or a saved folder's ``model.safetensors``.

    Raises:
        FileNotFoundError: neither exists.
    """
    p = Path(path)
    if p.is_dir():
        p = p / 'model.safetensors'
    if not p.is_file():
        raise FileNotFoundError(f'--initial-checkpoint {path} does not exist (expected a .safetensors/.pth file or '
                                'a folder holding model.safetensors, such as runs/<name>/best)')
    return p


def _arch_name(model: nn.Module) -> str:
    """The model's architecture name for messages."""
    return str((getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__)


def _load_initial_checkpoint(model: nn.Module, path: str | Path) -> None:
    """timm train.py's ``--initial-checkpoint``: every tensor of the file into the built model, strictly."""
    file = checkpoint_file(path)
    try:
        timm.models.load_checkpoint(model, str(file), strict=True)
    except (RuntimeError, SafetensorError) as e:  # missing / unexpected keys, shapes, a refused pickle, damage
        raise ValueError(f'--initial-checkpoint {file} cannot be loaded strictly into {_arch_name(model)} as built '
                         f'(classes and channels come from the data; --pretrained-file adapts a checkpoint whose '
                         f'classifier or input channels differ): {str(e).strip().splitlines()[0]}') from e
    _logger.info('Loaded every weight of %s into %s (--initial-checkpoint)', file, _arch_name(model))


def weights_origin(model: nn.Module, cfg: FinetuneConfig) -> Dict[str, Any] | None:
    """Where the run's starting weights came from, or None when it started from random initialisation.

    Returns:
        ``finetuned_from`` (the model name, a weights file's name, or both) and ``license`` (the starting
        weights' license as their pretrained cfg records it, or None).
    """
    pretrained = cfg.pretrained or cfg.pretrained_file is not None or cfg.model.startswith('local-dir:')
    files = [Path(f).name for f in (cfg.pretrained_file, cfg.initial_checkpoint) if f is not None]
    if not pretrained and not files:
        return None
    source = cfg.model if pretrained and cfg.pretrained_file is None else ''
    source = ' + '.join(x for x in [source] + files if x)
    # --pretrained-file / --initial-checkpoint replace the registry's weights: their license is not the file's
    from_registry = pretrained and cfg.pretrained_file is None and cfg.initial_checkpoint is None
    license = (getattr(model, 'pretrained_cfg', None) or {}).get('license') if from_registry else None
    return dict(finetuned_from=source, license=license)


def model_identity(model: nn.Module, cfg: FinetuneConfig, num_classes: int, in_chans: int) -> Dict[str, Any]:
    """What must match for a checkpoint to be resumable into this run."""
    args = dropout_args(model) if hasattr(model, 'head_drop') else None
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or _architecture(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    return dict(architecture=arch, num_classes=num_classes, in_chans=in_chans, dropout_args=args, num_params=n_params)
