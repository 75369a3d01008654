"""One model reference: a model string parsed once, with timm's own parsers.

timm names a model three ways (``timm.models.parse_model_name``): a registry name with an optional
pretrained tag (``resnet50_dropres.a1_in1k``, split by ``timm.models.split_model_name_tag``),
``hf-hub:<repo id>`` and ``local-dir:<folder>``. :class:`ModelRef` holds the parts, reads a folder's
``config.json`` once, and gives the one definition of "does this reference load weights" that building,
training, evaluation, the audit, the analysis, model cards and uploads share. Nothing else in the package
slices these prefixes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from timm.models import parse_model_name, split_model_name_tag

from .hf_folder import CONFIG_NAME, read_folder_config

__all__ = ['ModelRef', 'HF_HUB', 'LOCAL_DIR']

#: timm's source names (the part before ``:``), as ``parse_model_name`` returns them.
HF_HUB = 'hf-hub'
LOCAL_DIR = 'local-dir'
_LOCAL_DIR_PREFIX = 'local-dir:'


@dataclass(frozen=True)
class ModelRef:
    """A parsed model string.

    Attributes:
        name: the string as given (what ``timm.create_model`` receives).
        source: None for a timm registry name, else ``'hf-hub'`` or ``'local-dir'``.
        model_id: the part after the source prefix: the registry name with its tag, a Hub repo id, a folder.
        architecture: the registered architecture: the name without its tag, a folder's ``config.json``
            ``architecture``, or None for a Hub id (known only after download).
        tag: the pretrained tag of a registry name (``''`` when none).
        folder_config: a folder's ``config.json``, read once (None for other sources).
    """
    name: str
    source: Optional[str]
    model_id: str
    architecture: Optional[str]
    tag: str = ''
    folder_config: Optional[Mapping[str, Any]] = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, name: str, *, read_folder: bool = True) -> ModelRef:
        """Parse ``name``; a ``local-dir:`` folder's ``config.json`` is read here, once.

        Args:
            name: a timm model name, ``hf-hub:<repo id>`` or ``local-dir:<folder>``.
            read_folder: read a folder's ``config.json`` (False: a name recorded elsewhere, whose folder need
                not exist here; ``architecture`` is then None).

        Returns:
            The reference.

        Raises:
            ValueError: an unknown source prefix, an empty id, a name that looks like a path or repo id but
                has no prefix (timm's own checks), or a folder whose ``config.json`` is not JSON.
            FileNotFoundError: a folder without ``config.json``.
        """
        source, model_id = parse_model_name(name)
        if source is None:
            arch, tag = split_model_name_tag(model_id)
            return cls(name, None, model_id, arch, tag)
        if source == LOCAL_DIR and read_folder:
            if not Path(model_id).is_dir():
                raise FileNotFoundError(f'model folder {model_id} does not exist (from {name}; expected a folder '
                                        f'holding {CONFIG_NAME} and the weights)')
            config = read_folder_config(model_id)
            arch = config.get('architecture')
            return cls(name, source, model_id, arch if isinstance(arch, str) else None, '', config)
        return cls(name, source, model_id, None)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ModelRef:
        """The reference of a saved folder (``config.json`` + weights).

        Args:
            folder: the folder.

        Returns:
            ``ModelRef.parse('local-dir:<folder>')``.
        """
        return cls.parse(f'{_LOCAL_DIR_PREFIX}{os.fspath(folder)}')

    @property
    def folder(self) -> Optional[Path]:
        """The saved folder of a ``local-dir:`` reference, else None."""
        return Path(self.model_id) if self.source == LOCAL_DIR else None

    @property
    def is_folder(self) -> bool:
        """True for a ``local-dir:`` reference."""
        return self.source == LOCAL_DIR

    @property
    def hub_id(self) -> Optional[str]:
        """The Hub repo id of an ``hf-hub:`` reference (without a ``@revision``), else None."""
        return self.model_id.split('@')[0] if self.source == HF_HUB else None

    def loads_weights(self, pretrained: bool = False) -> bool:
        """Whether ``timm.create_model`` should load weights: the one definition of "pretrained".

        A Hub id or a saved folder names weights, so it always loads them; a registry name loads its
        pretrained weights only when asked.

        Args:
            pretrained: the caller's request (``--pretrained``).

        Returns:
            ``pretrained`` for a registry name, True for ``hf-hub:`` and ``local-dir:``.
        """
        return pretrained or self.source is not None

    @property
    def num_classes(self) -> Optional[int]:
        """A folder's classifier size (``config.json``'s ``num_classes``), else None."""
        value = (self.folder_config or {}).get('num_classes')
        return value if isinstance(value, int) else None

    @property
    def label_names(self) -> Optional[List[str]]:
        """A folder's class names (``config.json``'s ``label_names``), else None."""
        names = (self.folder_config or {}).get('label_names')
        return list(names) if names is not None else None

    def create_name(self, pretrained: bool) -> str:
        """The name to give ``timm.create_model``: a folder without its weights is built by architecture.

        Args:
            pretrained: whether the weights are loaded.

        Returns:
            :attr:`name`, or a folder's :attr:`architecture` when ``pretrained`` is False.
        """
        if self.is_folder and not pretrained and self.architecture:
            return self.architecture
        return self.name

    def as_dict(self) -> Dict[str, Any]:
        """The parsed parts (JSON-able), for messages and records.

        Returns:
            ``name``, ``source``, ``model_id``, ``architecture`` and ``tag``.
        """
        return dict(name=self.name, source=self.source, model_id=self.model_id, architecture=self.architecture,
                    tag=self.tag)
