"""Model building for fine-tuning and validation: the model checks, dropout kwargs, ``timm.create_model``.

Everything here goes through timm's public API (``is_model``, ``list_models``, ``create_model`` with
``pretrained_cfg_overlay``), so any timm model works; the ``*_dropres`` ones add the dropout flags. The model
string is parsed once into a :class:`~timm_dropres.models.reference.ModelRef` by :func:`resolve_model`, which
also does every check that needs the registry or the file system; the functions after it take that reference.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import timm
import torch.nn as nn
from safetensors import SafetensorError

from ..checks import check_output_outside_data, check_safetensors_file
from ..models.convert import dropout_args
from ..models.hf_folder import WEIGHTS_NAME
from ..models.reference import ModelRef
from .config import FinetuneConfig, OptionError

__all__ = ['resolve_model', 'check_model', 'check_compile_backend', 'dropout_kwargs', 'in_chans_of', 'build_model',
           'model_identity', 'weights_origin', 'checkpoint_file']

_logger = logging.getLogger(__name__)


def check_model(ref: ModelRef) -> None:
    """Fail early with a clear message for an unknown model name or tag, or a folder timm cannot build.

    Args:
        ref: the parsed model.

    Raises:
        OptionError: an unknown architecture (with close names), an unknown pretrained tag (with the valid
            ones), a folder whose ``config.json`` names an architecture that is not registered, or whose
            weights file is damaged.
    """
    if ref.is_folder:
        arch = (ref.folder_config or {}).get('architecture')
        if not isinstance(arch, str) or not timm.is_model(arch):
            known = timm.list_models('*_dropres')[:3]
            raise OptionError('{folder}/config.json: architecture {arch!r} is not a registered timm model, so the '
                              'folder cannot be loaded; expected a timm name, e.g. a dropres one like {known}',
                              folder=str(ref.folder), arch=arch, known=known)
        if (ref.folder / WEIGHTS_NAME).exists():  # a damaged file is named now, not in a traceback later
            check_safetensors_file(ref.folder / WEIGHTS_NAME, 'model', ref.name)
        return
    if ref.architecture is None:  # a Hub id: known only after download
        return
    if not timm.is_model(ref.architecture):
        close = difflib.get_close_matches(ref.architecture, timm.list_models(), n=5, cutoff=0.6)
        hint = f'; did you mean one of {close}?' if close else '; see timm.list_models() for the names'
        raise OptionError('unknown model {name!r}{hint}', name=ref.name, hint=hint)
    if ref.tag:  # timm raises a bare RuntimeError for an unknown tag, at creation
        try:
            timm.models.get_pretrained_cfg(ref.name)
        except RuntimeError:
            tags = [m.split('.', 1)[1] for m in timm.list_models(ref.architecture, include_tags=True) if '.' in m]
            raise OptionError('unknown pretrained tag {tag!r} for {arch} (from {0} {name}); valid tags: {tags}',
                              'model', tag=ref.tag, arch=ref.architecture, name=ref.name,
                              tags=tags or 'none (give the name without a tag)') from None


def check_compile_backend(backend: str) -> str:
    """Check that ``torch.compile`` knows ``backend`` (the ``torchcompile`` option).

    Args:
        backend: a backend name, e.g. ``'inductor'``.

    Returns:
        ``backend``.

    Raises:
        OptionError: an unknown backend, listing the valid ones.
    """
    import torch

    valid = torch.compiler.list_backends(exclude_tags=())
    if backend not in valid:
        raise OptionError('{0} {backend!r} is not a torch.compile backend; valid: {valid}', 'torchcompile',
                          backend=backend, valid=valid)
    return backend


def resolve_model(cfg: FinetuneConfig) -> ModelRef:
    """Parse ``cfg.model`` once and run every check that needs the model registry or the file system.

    ``finetune`` calls this before it creates anything; the CLI calls it right after parsing, so a bad
    option is a usage error.

    Args:
        cfg: the run's options (their values are already checked by the config itself).

    Returns:
        The parsed model reference (a folder's ``config.json`` is read here, once).

    Raises:
        OptionError: an unknown model or tag, a folder timm cannot build, dropres-only options for another
            model, an unknown compile backend, a weights file that does not exist or is damaged, or an output
            folder inside the ImageFolder dataset.
        ValueError: a model string timm cannot parse (``timm.models.parse_model_name``).
        FileNotFoundError: a ``local-dir:`` folder that does not exist or has no ``config.json``.
    """
    ref = ModelRef.parse(cfg.model)
    check_model(ref)
    _check_dropres_options(cfg, ref)
    if cfg.torchcompile is not None:
        check_compile_backend(cfg.torchcompile)
    if cfg.initial_checkpoint is not None:
        checkpoint_file(cfg.initial_checkpoint)
    if cfg.pretrained_file is not None and not Path(cfg.pretrained_file).is_file():
        raise OptionError('{0} {path} does not exist', 'pretrained_file', path=cfg.pretrained_file)
    for name in ('pretrained_file', 'initial_checkpoint'):  # a damaged weights file is named now, not in a traceback
        path = getattr(cfg, name)
        file = Path(path) / WEIGHTS_NAME if path is not None and Path(path).is_dir() else path
        if file is not None and Path(file).suffix == '.safetensors' and Path(file).is_file():
            check_safetensors_file(file, name)
    if cfg.dataset and Path(cfg.dataset).expanduser().is_dir():  # an ImageFolder: the run folder stays outside it
        check_output_outside_data(cfg.output_dir, Path(cfg.dataset).expanduser())
    return ref


def _check_dropres_options(cfg: FinetuneConfig, ref: ModelRef) -> None:
    """Refuse the residual dropout options for a model that has no residual dropout."""
    arch = ref.architecture
    given = [k for k in ('res_drop_rate', 'res_drop_pos') if getattr(cfg, k) is not None]
    if arch is None or arch.endswith('_dropres') or not given:
        return
    names = ' and '.join(f'{{{i}}}' for i in range(len(given)))  # the options, as template fields
    twin = f'{arch}_dropres'
    fix = (f'use {{{len(given)}}} {{twin}} (same weights, guideline dropout)' if timm.is_model(twin)
           else 'only ResNet/ResNetV2 families have *_dropres variants (timm_dropres.registered_models())')
    raise OptionError(names + ' need a *_dropres model, but {name!r} is not one; ' + fix, *given, 'model',
                      name=cfg.model, twin=twin)


def dropout_kwargs(cfg: FinetuneConfig) -> Dict[str, Any]:
    """The dropout keywords for ``timm.create_model``: the options that are set (checked by the config).

    Args:
        cfg: the run's options.

    Returns:
        ``drop_rate``, ``res_drop_rate``, ``res_drop_pos``, ``drop_path_rate`` and ``drop_block_rate``, those set.
    """
    names = ('drop_rate', 'res_drop_rate', 'res_drop_pos', 'drop_path_rate', 'drop_block_rate')
    return {k: getattr(cfg, k) for k in names if getattr(cfg, k) is not None}


def in_chans_of(model: nn.Module) -> int:
    """Input channels of the first convolution: what the model expects of the data.

    Args:
        model: a CNN.

    Returns:
        The first ``nn.Conv2d``'s ``in_channels``.
    """
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def build_model(
        cfg: FinetuneConfig, ref: ModelRef, num_classes: int, in_chans: int,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """``timm.create_model`` for the data's classes and channels.

    Args:
        cfg: the run's options.
        ref: ``cfg.model`` parsed and checked (:func:`resolve_model`).
        num_classes: the data's class count.
        in_chans: the data's channel count.

    Returns:
        ``(model, kwargs)``: the model and the ``create_model`` keywords it was built with (without the weights
        file), which rebuild the same network.

    Raises:
        OptionError: the model does not take the keywords, does not support gradient checkpointing, or the
            initial checkpoint does not load strictly.
    """
    kwargs = dict(dropout_kwargs(cfg), num_classes=num_classes, in_chans=in_chans)
    kwargs.update(cfg.model_kwargs)
    pretrained = ref.loads_weights(cfg.pretrained or cfg.pretrained_file is not None)
    if cfg.pretrained_file is not None:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(cfg.pretrained_file))
    try:
        model = timm.create_model(cfg.model, pretrained=pretrained, **kwargs)
    except TypeError as e:  # e.g. hf-hub: model that is not a dropres one, given dropres flags
        raise OptionError('{name!r} does not accept {kwargs}: {e}', name=cfg.model, kwargs=sorted(kwargs), e=e) from e
    if cfg.initial_checkpoint is not None:
        _load_initial_checkpoint(model, cfg.initial_checkpoint)
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, AssertionError, NotImplementedError) as e:
            raise OptionError('{0}: {name} does not support gradient checkpointing ({e})', 'grad_checkpointing',
                              name=cfg.model, e=e) from e
    if pretrained:
        pc = model.pretrained_cfg or {}
        src_classes = ref.num_classes or pc.get('num_classes')
        if src_classes and src_classes != num_classes:
            _logger.info('Pretrained %s has a %d-class classifier; replaced it with a new, randomly initialised '
                         '%d-class classifier for this dataset', cfg.model, src_classes, num_classes)
        src_chans = (pc.get('input_size') or (3,))[0]
        if src_chans != in_chans:
            _logger.info('Pretrained first conv takes %d channels; timm adapted it to %d (adapt_input_conv)',
                         src_chans, in_chans)
    if 'drop_rate' in kwargs and not hasattr(model, 'head_drop'):
        _logger.info("%s is not a dropres model: drop_rate %.3g is timm's own dropout after global pooling",
                     cfg.model, kwargs['drop_rate'])
    kwargs.pop('pretrained_cfg_overlay', None)
    return model, kwargs


def checkpoint_file(path: str | Path) -> Path:
    """The weights file of the ``initial_checkpoint`` option: the file itself, or a saved folder's weights.

    Args:
        path: a ``.safetensors``/``.pth`` file, or a folder holding ``model.safetensors``.

    Returns:
        The file.

    Raises:
        OptionError: neither exists.
    """
    p = Path(path)
    if p.is_dir():
        p = p / 'model.safetensors'
    if not p.is_file():
        raise OptionError('{0} {path} does not exist (expected a .safetensors/.pth file or a folder holding '
                          'model.safetensors, such as runs/<name>/best)', 'initial_checkpoint', path=path)
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
        raise OptionError('{0} {file} cannot be loaded strictly into {arch} as built (classes and channels come '
                          'from the data; {1} adapts a checkpoint whose classifier or input channels differ): '
                          '{problem}', 'initial_checkpoint', 'pretrained_file', file=file, arch=_arch_name(model),
                          problem=str(e).strip().splitlines()[0]) from e
    _logger.info('Loaded every weight of %s into %s (initial checkpoint)', file, _arch_name(model))


def weights_origin(model: nn.Module, cfg: FinetuneConfig, ref: ModelRef) -> Dict[str, Any] | None:
    """Where the run's starting weights came from, or None when it started from random initialisation.

    Args:
        model: the built model.
        cfg: the run's options.
        ref: ``cfg.model`` parsed.

    Returns:
        ``finetuned_from`` (the model name, a weights file's name, or both) and ``license`` (the starting
        weights' license as their pretrained cfg records it, or None).
    """
    pretrained = ref.loads_weights(cfg.pretrained or cfg.pretrained_file is not None)
    files = [Path(f).name for f in (cfg.pretrained_file, cfg.initial_checkpoint) if f is not None]
    if not pretrained and not files:
        return None
    source = cfg.model if pretrained and cfg.pretrained_file is None else ''
    source = ' + '.join(x for x in [source] + files if x)
    # --pretrained-file / --initial-checkpoint replace the registry's weights: their license is not the file's
    from_registry = pretrained and cfg.pretrained_file is None and cfg.initial_checkpoint is None
    license = (getattr(model, 'pretrained_cfg', None) or {}).get('license') if from_registry else None
    return dict(finetuned_from=source, license=license)


def model_identity(model: nn.Module, ref: ModelRef, num_classes: int, in_chans: int) -> Dict[str, Any]:
    """What must match for a checkpoint to be resumable into this run.

    Args:
        model: the built model.
        ref: the run's model reference.
        num_classes: the data's class count.
        in_chans: the data's channel count.

    Returns:
        ``architecture``, ``num_classes``, ``in_chans``, ``dropout_args`` (None for a model without
        guideline dropout) and ``num_params``.
    """
    args = dropout_args(model) if hasattr(model, 'head_drop') else None
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or ref.architecture
    n_params = sum(p.numel() for p in model.parameters())
    return dict(architecture=arch, num_classes=num_classes, in_chans=in_chans, dropout_args=args, num_params=n_params)
