"""Write a model as a Hugging Face folder that ``timm.create_model('local-dir:...')`` rebuilds.

timm's ``save_for_hf`` omits drop rates from ``model_args`` unless told, so this passes
``dropout_args`` explicitly; weights are written as safetensors only (no pickle), and the folder
appears atomically (written beside the target, then renamed) so a crash never leaves half a folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn
from timm.models import save_for_hf

from ..models.convert import dropout_args

__all__ = ['save_pretrained_folder', 'read_folder_config', 'WEIGHTS_NAME', 'CONFIG_NAME']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'


def save_pretrained_folder(
        model: nn.Module,
        out_dir: str | os.PathLike,
        *,
        label_names: Optional[Sequence[str]] = None,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save ``model`` (unwrapped, on any device) to ``out_dir`` as ``config.json`` + ``model.safetensors``.

    ``out_dir`` is replaced atomically if it exists. ``extra_config`` keys are added at the root of
    ``config.json`` (timm ignores unknown keys when loading).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model_config: Dict[str, Any] = dict(extra_config or {})
    if label_names is not None:
        model_config['label_names'] = list(label_names)
    args = dropout_args(model) if hasattr(model, 'head_drop') else None
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        save_for_hf(model, str(tmp), model_config=model_config, model_args=args, safe_serialization=True)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f'.{out_dir.name}.old')
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
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON: {e}') from e
