"""Weights this project has published on the Hub, as extra pretrained tags of the ``*_dropres`` models.

The registry is data, not code: ``published.json`` beside this module maps a dropres model name to
its published tags, each a timm ``PretrainedCfg`` (``hf_hub_id`` plus the preprocessing and class
fields copied from the published ``config.json``)::

    {"resnet18_dropres": {"fmnist_ft": {"hf_hub_id": "<org>/resnet18_dropres.fmnist_ft",
                                         "num_classes": 10, "input_size": [1, 28, 28], ...}}}

At import, ``dropres._register_all`` passes each model's mirrored base cfgs through
``with_published_tags`` so ``timm.list_pretrained()`` shows ``resnet18_dropres.fmnist_ft`` and
``create_model('resnet18_dropres.fmnist_ft', pretrained=True)`` downloads from its ``hf_hub_id``.
A published tag is appended after the base tags, so it never becomes the model's default tag
unless its entry says ``"default": true``.

The environment variable ``TIMM_DROPRES_PUBLISHED`` names one more JSON file in the same format,
read after the shipped one (its entries win, with a warning): maintainers try an entry before it
ships, and tests exercise the mechanism without touching the shipped data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping

import timm
from timm.models import DefaultCfg, PretrainedCfg

__all__ = [
    'REGISTRY_PATH', 'ENV_VAR', 'DEFAULT_KEY', 'load_published', 'published_tags', 'with_published_tags',
    'registry_entry',
]

_logger = logging.getLogger(__name__)

REGISTRY_PATH = Path(__file__).with_name('published.json')
ENV_VAR = 'TIMM_DROPRES_PUBLISHED'
#: entry key (not a PretrainedCfg field) that makes a published tag the model's default tag
DEFAULT_KEY = 'default'
_SUFFIX = '_dropres'  # same as dropres.SUFFIX; not imported to keep this module free of the registration import
# filled in by timm's register_model for the dropres name, so an entry must not set them
_RESERVED = ('architecture', 'tag', 'source', 'file', 'state_dict')
_FIELDS = tuple(f.name for f in dataclasses.fields(PretrainedCfg) if f.name not in _RESERVED)
_TUPLE_FIELDS = ('input_size', 'test_input_size', 'min_input_size', 'mean', 'std', 'pool_size', 'test_pool_size')

Registry = Dict[str, Dict[str, Dict[str, Any]]]


def _check_entry(source: str, model: str, tag: str, entry: Any) -> Dict[str, Any]:
    where = f'{source}: {model}.{tag}'
    if not isinstance(entry, dict):
        raise ValueError(f'{where} must be a JSON object of PretrainedCfg fields, got {type(entry).__name__}')
    unknown = sorted(set(entry) - set(_FIELDS) - {DEFAULT_KEY})
    if unknown:
        raise ValueError(f'{where} has unknown keys {unknown}; valid keys: {sorted(_FIELDS + (DEFAULT_KEY,))}')
    hub_id = entry.get('hf_hub_id')
    if not isinstance(hub_id, str) or hub_id.count('/') != 1 or hub_id.startswith('/') or hub_id.endswith('/'):
        raise ValueError(f'{where} needs "hf_hub_id": "<namespace>/<repo>" (the published repo), got {hub_id!r}')
    if not isinstance(entry.get(DEFAULT_KEY, False), bool):
        raise ValueError(f'{where}: "{DEFAULT_KEY}" must be true or false, got {entry[DEFAULT_KEY]!r}')
    if 'input_size' in entry and (not isinstance(entry['input_size'], list) or len(entry['input_size']) != 3):
        raise ValueError(f'{where}: "input_size" must be [channels, height, width], got {entry["input_size"]!r}')
    return entry


def _read(path: Path, known: Iterable[str] | None) -> Registry:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        where = 'the package data is missing from this install' if path == REGISTRY_PATH else f'check {ENV_VAR}'
        raise FileNotFoundError(f'published-tags registry {path} does not exist ({where})') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'published-tags registry {path} is not valid JSON: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} must hold a JSON object {{"<arch>_dropres": {{"<tag>": {{...}}}}}}')
    known = set(known) if known is not None else None
    for model, tags in data.items():
        base_ok = model.endswith(_SUFFIX) and timm.is_model(model[:-len(_SUFFIX)])
        if not base_ok or (known is not None and model not in known):
            raise ValueError(
                f'{path}: {model!r} is not a dropres model name; keys are "<timm resnet/resnetv2 arch>{_SUFFIX}" '
                'as listed by timm_dropres.registered_models()')
        if not isinstance(tags, dict) or not tags:
            raise ValueError(f'{path}: {model!r} must map tag names to entries, got {tags!r}')
        for tag, entry in tags.items():
            if not tag or '.' in tag:
                raise ValueError(f'{path}: {model}: tag {tag!r} must be non-empty and contain no "."')
            _check_entry(str(path), model, tag, entry)
    return data


def load_published(path: str | os.PathLike | None = None, *, known: Iterable[str] | None = None) -> Registry:
    """Load the published-tags registry: the shipped ``published.json`` (or ``path``), then the extra file.

    The file named by ``$TIMM_DROPRES_PUBLISHED`` (if set) is read after the first one and merged tag by
    tag; where both define the same ``<model>.<tag>``, the extra file wins and a warning is logged. Every
    entry is validated, so a typo fails at import rather than at download time.

    Args:
        path: registry file to read instead of the shipped ``published.json``; None or empty reads the
            shipped one.
        known: the registered dropres model names. When given, a model outside it is an error, not an
            ignored entry; when None, any ``<timm arch>_dropres`` name is accepted.

    Returns:
        ``{model: {tag: entry}}``, each entry a dict of ``PretrainedCfg`` fields plus the optional
        ``"default"`` flag.

    Raises:
        FileNotFoundError: if a registry file (``path``, the shipped one, or ``$TIMM_DROPRES_PUBLISHED``)
            does not exist.
        ValueError: if a file is not valid JSON, or an entry is malformed: not a dropres model name, an
            empty or dotted tag, unknown keys, no ``"<namespace>/<repo>"`` ``hf_hub_id``, a non-boolean
            ``"default"`` or an ``input_size`` that is not ``[C, H, W]``.
    """
    known = list(known) if known is not None else None
    merged: Registry = {m: dict(t) for m, t in _read(Path(path) if path else REGISTRY_PATH, known).items()}
    extra = os.environ.get(ENV_VAR)
    if extra:
        for model, tags in _read(Path(extra), known).items():
            for tag, entry in tags.items():
                if tag in merged.get(model, {}):
                    _logger.warning('%s overrides the shipped published tag %s.%s', ENV_VAR, model, tag)
                merged.setdefault(model, {})[tag] = entry
    return merged


def published_tags(path: str | os.PathLike | None = None) -> Dict[str, str]:
    """Map every published ``<model>.<tag>`` name to the Hub repo its weights download from.

    Args:
        path: registry file to read instead of the shipped one (``$TIMM_DROPRES_PUBLISHED`` is still read
            after it, as in ``load_published``).

    Returns:
        ``{'<model>.<tag>': hf_hub_id}``; empty when nothing is published.

    Raises:
        FileNotFoundError: if a registry file does not exist.
        ValueError: if a registry file is malformed (see ``load_published``).

    Example:
        >>> from timm_dropres.models.published import published_tags
        >>> published_tags()  # doctest: +SKIP
        {'resnet18_dropres.fmnist_ft': '<org>/resnet18_dropres.fmnist_ft'}
    """
    return {f'{m}.{t}': e['hf_hub_id'] for m, tags in load_published(path).items() for t, e in tags.items()}


def _to_cfg(entry: Mapping[str, Any]) -> PretrainedCfg:
    fields = {k: (tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v)
              for k, v in entry.items() if k != DEFAULT_KEY}
    # published folders hold model.safetensors; timm's default filename would try pytorch_model.bin first
    fields.setdefault('hf_hub_filename', 'model.safetensors')
    fields.setdefault('custom_load', False)
    return PretrainedCfg(**fields)


def with_published_tags(
        model: str,
        cfgs: DefaultCfg | None,
        registry: Registry | None = None,
) -> DefaultCfg | None:
    """Add the published tags of ``model`` to its pretrained cfgs, for registration with timm.

    Published tags go after the base tags, or first (the model's default tag) when marked
    ``"default": true``. Each becomes a ``PretrainedCfg`` that downloads ``model.safetensors`` from its
    ``hf_hub_id``. A model without base tags gets an untagged, weightless default first, so
    ``pretrained=True`` without a tag does not silently pick a published tag.

    Args:
        model: the dropres model name, e.g. ``'resnet18_dropres'``.
        cfgs: the mirrored base pretrained cfgs of ``model``, or None if it has none.
        registry: the loaded registry; None loads it with ``load_published()``.

    Returns:
        ``cfgs`` itself when ``model`` has no published tag, else a new ``DefaultCfg`` holding the base
        and published tags (``is_pretrained=True``).

    Raises:
        ValueError: if a published tag has the name of a base tag (it would silently shadow the base
            weights), or if ``registry`` is None and loading it fails (see ``load_published``).
        FileNotFoundError: if ``registry`` is None and a registry file is missing.
    """
    entries = (load_published() if registry is None else registry).get(model)
    if not entries:
        return cfgs
    if cfgs is None:
        # no base tags: keep an untagged, weightless default so pretrained=True does not pick a published tag
        cfgs = DefaultCfg(tags=deque(['']), cfgs={'': PretrainedCfg()}, is_pretrained=False)
    tags, out = deque(cfgs.tags), dict(cfgs.cfgs)
    for tag, entry in entries.items():
        if tag in out:
            raise ValueError(
                f'published tag {model}.{tag} has the name of a base pretrained tag of {model}; choose another tag')
        out[tag] = _to_cfg(entry)
        if entry.get(DEFAULT_KEY, False):
            tags.appendleft(tag)
        else:
            tags.append(tag)
    return DefaultCfg(tags=tags, cfgs=out, is_pretrained=True)


def registry_entry(config: Mapping[str, Any], hf_hub_id: str, *, default: bool = False) -> Dict[str, Any]:
    """Build the ``published.json`` entry for an exported folder once it is pushed to ``hf_hub_id``.

    Copies the preprocessing and class fields of the folder's ``config.json`` so that
    ``create_model('<arch>.<tag>', pretrained=True)`` builds the published head (``num_classes``) and
    input channels (``input_size[0]``) by default, without extra arguments.

    Args:
        config: the folder's ``config.json`` as a dict (``architecture``, ``num_classes``, optional
            ``label_names`` and ``pretrained_cfg``).
        hf_hub_id: the Hub repo the folder was pushed to, ``'<namespace>/<repo>'``.
        default: mark the tag as the model's default tag (``"default": true``).

    Returns:
        The entry: ``hf_hub_id``, ``hf_hub_filename='model.safetensors'``, the ``PretrainedCfg`` fields
        of ``pretrained_cfg`` (its ``url``/hub fields excluded), ``num_classes``, ``label_names`` if
        present, and ``"default"`` if requested.

    Raises:
        ValueError: if ``hf_hub_id`` is not ``'<namespace>/<repo>'`` or ``input_size`` is not
            ``[C, H, W]``.

    Example:
        >>> cfg = {'architecture': 'resnet18_dropres', 'num_classes': 10,
        ...        'pretrained_cfg': {'input_size': [1, 28, 28], 'mean': [0.5], 'std': [0.5]}}
        >>> registry_entry(cfg, 'org/resnet18_dropres.fmnist_ft')  # doctest: +NORMALIZE_WHITESPACE
        {'hf_hub_id': 'org/resnet18_dropres.fmnist_ft', 'hf_hub_filename': 'model.safetensors',
         'input_size': [1, 28, 28], 'mean': [0.5], 'std': [0.5], 'num_classes': 10}
    """
    pcfg = dict(config.get('pretrained_cfg') or {})
    pcfg['num_classes'] = config.get('num_classes', pcfg.get('num_classes'))
    if config.get('label_names') is not None:
        pcfg['label_names'] = list(config['label_names'])
    entry: Dict[str, Any] = {'hf_hub_id': hf_hub_id, 'hf_hub_filename': 'model.safetensors'}
    entry.update({k: v for k, v in pcfg.items() if k in _FIELDS and k not in ('hf_hub_id', 'url', 'hf_hub_filename')})
    if default:
        entry[DEFAULT_KEY] = True
    _check_entry('registry_entry', str(config.get('architecture')), 'new', entry)
    return entry
