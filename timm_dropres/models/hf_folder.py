"""Write a model as a Hugging Face folder that timm (``local-dir:``/``hf-hub:``) and transformers both load.

timm's ``save_for_hf`` omits drop rates from ``model_args`` unless told, so this passes ``dropout_args``
explicitly; weights are written as safetensors only (no pickle), and the folder appears atomically
(written beside the target, then renamed) so a crash never leaves half a folder.

Two things differ from ``save_for_hf``'s output, both for loaders other than timm itself:

* ``model_args`` never holds ``num_classes``: the root ``num_classes`` already says it, and
  transformers' ``TimmWrapper`` passes ``num_classes`` itself, so a second one is a ``TypeError``.
* Weights that were trained here (``data_config`` given) get a ``pretrained_cfg`` that describes them:
  the architecture's fields, the preprocessing they were trained and evaluated with, and a license
  only when one is given. Nothing is inherited from the checkpoint the model was built from (its tag,
  paper ids, test-time input size), because it is not that checkpoint any more.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import save_for_hf

from ..checks import check_folder_config
from ..files import files_like_folder, replaced_name, temp_dir_beside
from .convert import dropout_args
from .summary import dropout_sites

__all__ = ['save_pretrained_folder', 'read_folder_config', 'trained_pretrained_cfg', 'WEIGHTS_NAME', 'CONFIG_NAME',
           'ARCH_CFG_KEYS', 'DATA_CFG_KEYS']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
#: pretrained_cfg fields that describe the network itself: kept from the model for trained weights.
ARCH_CFG_KEYS = ('num_classes', 'pool_size', 'first_conv', 'classifier', 'fixed_input_size', 'min_input_size',
                 'custom_load')
#: pretrained_cfg fields of the preprocessing (timm's data config); the first five are required in ``data_config``.
DATA_CFG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
_REQUIRED_DATA_KEYS = DATA_CFG_KEYS[:5]


def trained_pretrained_cfg(
        model: nn.Module,
        data_config: Mapping[str, Any],
        *,
        license: Optional[str] = None,
) -> Dict[str, Any]:
    """The ``pretrained_cfg`` of weights trained with ``data_config``: nothing of the source checkpoint's.

    Args:
        model: the trained model (its ``pretrained_cfg`` supplies the architecture fields only).
        data_config: the preprocessing the weights were trained and evaluated with: ``input_size``
            (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct`` and optionally ``crop_mode``
            (``timm.data.resolve_model_data_config`` returns such a dict).
        license: the weights' license, e.g. the base weights' license for a fine-tuned model; None
            for weights whose license is unknown (trained from scratch: the owner decides).

    Returns:
        The dict to store as ``config.json``'s ``pretrained_cfg``.

    Raises:
        ValueError: ``data_config`` lacks a required key, has an unknown one, or its channel count
            differs from the model's first convolution.
    """
    unknown = sorted(set(data_config) - set(DATA_CFG_KEYS))
    missing = [k for k in _REQUIRED_DATA_KEYS if data_config.get(k) is None]
    if unknown or missing:
        raise ValueError(f'data_config: unknown keys {unknown}, missing keys {missing}; '
                         f'expected {list(DATA_CFG_KEYS)} (crop_mode optional)')
    input_size = tuple(int(s) for s in data_config['input_size'])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if len(input_size) != 3 or (first_conv is not None and input_size[0] != first_conv.in_channels):
        raise ValueError(f'data_config input_size {input_size} must be (C, H, W) with C = the model\'s '
                         f'{first_conv.in_channels if first_conv is not None else "?"} input channels')
    source = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg: Dict[str, Any] = {k: source[k] for k in ARCH_CFG_KEYS if k in source}
    cfg['num_classes'] = getattr(model, 'num_classes', source.get('num_classes'))
    if tuple(source.get('input_size', ())[1:]) != input_size[1:]:
        cfg['pool_size'] = None  # as timm's save_for_hf: the source's pool size is for another resolution
    if cfg.get('min_input_size'):
        cfg['min_input_size'] = [input_size[0], *cfg['min_input_size'][1:]]
    cfg.update({k: data_config[k] for k in DATA_CFG_KEYS if data_config.get(k) is not None})
    cfg['input_size'] = list(input_size)
    for k in ('mean', 'std'):
        cfg[k] = [float(v) for v in cfg[k]]
    cfg.setdefault('crop_mode', 'center')
    cfg['custom_load'] = False  # an exported state dict is always timm-native
    if license:
        cfg['license'] = license
    return cfg


def _contiguous_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are all contiguous (ties are kept)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if not t.is_contiguous():
                t.data = t.data.contiguous()
    return model


def save_pretrained_folder(
        model: nn.Module,
        out_dir: str | os.PathLike,
        *,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        license: Optional[str] = None,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save ``model`` (unwrapped, on any device) to ``out_dir`` as ``config.json`` + ``model.safetensors``.

    The folder loads with ``timm.create_model('local-dir:<out_dir>', pretrained=True)`` and with
    ``transformers.AutoModelForImageClassification.from_pretrained(out_dir)`` (after ``import timm_dropres``).

    Args:
        model: the model to save.
        out_dir: the folder; replaced atomically if it exists. It and its files get the modes that a plain
            ``mkdir`` and ``open`` give (the umask applies).
        label_names: class names, index order (``config.json``'s ``label_names``; transformers' ``id2label``).
        data_config: for weights trained here, the preprocessing they were trained and evaluated
            with (see :func:`trained_pretrained_cfg`); ``pretrained_cfg`` then describes these weights
            only. None: the model's own ``pretrained_cfg`` is written, for weights saved as loaded.
        license: with ``data_config``, the weights' license (None: none recorded).
        extra_config: keys added at the root of ``config.json`` (timm and transformers ignore them).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: a bad ``data_config`` (see :func:`trained_pretrained_cfg`).
    """
    out_dir = Path(out_dir)
    pretrained_cfg = trained_pretrained_cfg(model, data_config, license=license) if data_config is not None else None
    model_config: Dict[str, Any] = dict(extra_config or {})
    if label_names is not None:
        model_config['label_names'] = list(label_names)
    args = dropout_args(model) if dropout_sites(model) else None  # a dropres model, of any family
    if not all(t.is_contiguous() for t in model.state_dict().values()):
        # safetensors refuses strided tensors (a channels_last model's conv weights, a transposed weight):
        # save a copy whose tensors are contiguous; the caller's model keeps its layout
        model = _contiguous_copy(model)
    tmp = temp_dir_beside(out_dir)
    try:
        save_for_hf(model, str(tmp), model_config=model_config, model_args=args, safe_serialization=True)
        config = json.loads((tmp / CONFIG_NAME).read_text())
        config.get('model_args', {}).pop('num_classes', None)  # the root num_classes says it; see module doc
        if pretrained_cfg is not None:
            config['pretrained_cfg'] = pretrained_cfg
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=4), encoding='utf-8')
        files_like_folder(tmp)  # safetensors writes 0600; the folder itself has the umask's mode
        old = None
        if out_dir.exists():
            old = replaced_name(out_dir)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_folder_config(folder: str | os.PathLike) -> Dict[str, Any]:
    """Load ``config.json`` from a saved folder, with a clear error when it is missing or not JSON."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f'{folder!s} has no {CONFIG_NAME}; expected a folder written by save_pretrained_folder')
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON: {e}') from e
    return check_folder_config(config, path)  # types, lengths and sizes, before timm reads them
