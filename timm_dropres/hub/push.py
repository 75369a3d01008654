"""Publish a fine-tuned dropres folder (``config.json`` + ``model.safetensors``) to the Hugging Face Hub.

The upload follows timm's ``push_to_hf_hub`` (create the repo, keep an existing card, one
``upload_folder`` commit) but starts from a folder the trainer already wrote instead of a live model,
and validates everything first: a bad repo id, a missing or pickled weights file, or a config that
does not rebuild a dropres model fails before any network call. The ``HfApi`` is a parameter so
tests record the calls without patching anything globally.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping

import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import OptionError
from ..files import files_like_folder, temp_dir_beside
from ..models.dropres import registered_models
from ..models.hf_folder import CONFIG_NAME, WEIGHTS_NAME
from ..models.layers import check_dropout_args
from ..models.published import registry_entry
from ..models.reference import ModelRef
from .model_card import build_card, find_summary, read_summary, scrub_paths

__all__ = ['CARD_NAME', 'PushError', 'PushResult', 'FolderInfo', 'check_repo_id', 'inspect_folder',
           'write_repo_folder', 'push']

_logger = logging.getLogger(__name__)

CARD_NAME = 'README.md'
_DROPOUT_ARGS = ('drop_rate', 'res_drop_rate', 'res_drop_pos')
_TIMM_KEYS = ('architecture', 'num_classes', 'num_features', 'global_pool', 'label_names', 'label_descriptions',
              'model_args', 'pretrained_cfg')
_PICKLE_MAGIC = (b'PK\x03\x04', b'\x80')  # torch.save zip archive, raw pickle protocol >= 2


class PushError(OptionError):
    """Bad input to ``push``: raised before anything is uploaded.

    A message that names one of ``push``'s arguments names it by its parameter name (see ``OptionError``).
    """


@dataclass
class FolderInfo:
    """A validated folder: its config, weights file, summary (if any) and the model rebuilt on meta."""

    folder: Path
    config: Dict[str, Any]
    weights: Path
    model: nn.Module
    summary: Dict[str, Any] | None
    summary_path: Path | None
    checkpoint: str
    ignored: List[str] = field(default_factory=list)


@dataclass
class PushResult:
    repo_id: str
    files: List[str]  # what was (or, for a dry run, would be) uploaded
    card: str  # 'written', 'kept' (a card already on the Hub) or 'overwritten'
    dry_run: bool
    out_dir: Path | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    registry_entry: Dict[str, Any] = field(default_factory=dict)  # for published.json, see published.py
    architecture: str = ''


def check_repo_id(repo_id: str) -> str:
    """Check that ``repo_id`` is ``<namespace>/<name>`` as the Hub accepts it; the card's snippets need the namespace.

    Args:
        repo_id: the repo id.

    Returns:
        ``repo_id``.

    Raises:
        PushError: no namespace, or a name the Hub refuses.
    """
    if not isinstance(repo_id, str) or repo_id.count('/') != 1:
        raise PushError(
            f'invalid repo id {repo_id!r}: expected "<user or org>/<name>", e.g. "alice/resnet50_dropres.pets"')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f'invalid repo id {repo_id!r}: {e}') from None
    return repo_id


def _check_safetensors(path: Path) -> Dict[str, List[int]]:
    """Tensor shapes from the safetensors header, refusing anything else (a pickle renamed, a torn file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework='pt') as st:
            return {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
    except SafetensorError as e:
        with path.open('rb') as f:
            head = f.read(4)
        # only now: a valid safetensors header length may itself start with these bytes
        if head.startswith(_PICKLE_MAGIC):
            raise PushError(f'{path} is not a safetensors file: it starts like a pickle / torch.save checkpoint. Only '
                            'safetensors weights are published; re-export with '
                            'timm_dropres.models.hf_folder.save_pretrained_folder') from None
        raise PushError(f'{path} is not a valid safetensors file ({e})') from None


def _build_meta(config: Mapping[str, Any]) -> nn.Module:
    """The config's model on the meta device: cheap, no weights, no download, checks every argument."""
    args = dict(config.get('model_args') or {})
    args.setdefault('num_classes', config.get('num_classes'))
    try:
        with torch.device('meta'):
            return timm.create_model(config['architecture'], pretrained=False, **args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise PushError(f'config.json model_args {args} do not build {config["architecture"]}: {e}') from None


def _check_loads(ref: ModelRef) -> None:
    """Load the folder once as its users will, so that only what loads is published.

    The checks above read the config and the weights' header; this runs timm's own path
    (``timm.create_model('local-dir:<folder>', pretrained=True)`` with the plugin imported), which also
    catches config fields timm handles specially, e.g. a ``pretrained_cfg_overlay`` in ``model_args``.
    """
    folder = ref.folder
    try:
        timm.create_model(ref.name, pretrained=ref.loads_weights())
    except Exception as e:  # TypeError, RuntimeError, ValueError...: whatever users would see
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise PushError(f'{folder} does not load with timm.create_model("{ref.name}", pretrained=True): '
                        f'{type(e).__name__}: {first}. Only folders that load are published; re-export it with '
                        'timm_dropres.models.hf_folder.save_pretrained_folder') from None


def inspect_folder(folder: str | os.PathLike) -> FolderInfo:
    """Validate a folder written by ``save_pretrained_folder`` and read its ``summary.json`` if there is one.

    Args:
        folder: a run's ``best/`` or ``last/`` folder, or any folder ``save_pretrained_folder`` wrote.

    Returns:
        The config, the weights file, the model rebuilt on the meta device and the summary.

    Raises:
        PushError: the folder is missing files, its config does not rebuild a dropres model, its weights are
            not safetensors or do not fit, or it does not load with timm.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f'{folder} is not a folder; pass a run\'s best/ or last/ folder ({CONFIG_NAME} + weights)')
    weights = folder / WEIGHTS_NAME
    if not (folder / CONFIG_NAME).is_file() or not weights.is_file():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
        present = sorted(p.name for p in folder.iterdir())
        raise PushError(f'{folder} has no {" or ".join(missing)} (it holds {present or "nothing"}); expected a folder '
                        'written by timm_dropres.models.hf_folder.save_pretrained_folder, e.g. runs/<name>/best')
    try:
        ref = ModelRef.from_folder(folder)  # config.json is read here, once
    except ValueError as e:
        raise PushError(str(e)) from None
    config = dict(ref.folder_config or {})
    arch = config.get('architecture')
    known = registered_models()
    if arch not in known:
        hint = ' (a plain timm model: timm.models.push_to_hf_hub publishes those)' if arch in timm.list_models() else ''
        raise PushError(f'{folder / CONFIG_NAME}: architecture {arch!r} is not a dropres model{hint}; '
                        f'expected one of timm_dropres.registered_models(), e.g. {known[:3]}')
    if not isinstance(config.get('num_classes'), int) or config['num_classes'] < 0:
        raise PushError(
            f'{folder / CONFIG_NAME}: num_classes must be a non-negative integer, got {config.get("num_classes")!r}')
    model_args = config.get('model_args') or {}
    if model_args.get('num_classes', config['num_classes']) != config['num_classes']:
        raise PushError(f'{folder / CONFIG_NAME}: model_args num_classes {model_args["num_classes"]} disagrees with '
                        f'num_classes {config["num_classes"]}; re-export with '
                        'timm_dropres.models.hf_folder.save_pretrained_folder')
    missing_args = [k for k in _DROPOUT_ARGS if k not in model_args]
    if missing_args:
        raise PushError(f'{folder / CONFIG_NAME}: model_args lack {missing_args}, so the dropout placement would not '
                        'be rebuilt; re-export with timm_dropres.models.hf_folder.save_pretrained_folder')
    try:
        check_dropout_args(model_args['drop_rate'], model_args['res_drop_rate'], model_args['res_drop_pos'])
    except (TypeError, ValueError) as e:
        raise PushError(f'{folder / CONFIG_NAME}: {e}') from None
    pcfg = config.get('pretrained_cfg')
    missing_pcfg = [k for k in ('input_size', 'mean', 'std', 'crop_pct') if not isinstance(pcfg, dict) or k not in pcfg]
    if missing_pcfg:
        raise PushError(f'{folder / CONFIG_NAME}: pretrained_cfg lacks {missing_pcfg} (preprocessing users need)')

    shapes = _check_safetensors(weights)
    model = _build_meta(config)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))[:5]
        extra = sorted(set(shapes) - set(expected))[:5]
        wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])[:5]
        raise PushError(f'{weights} does not match {arch} as config.json builds it: missing {missing}, '
                        f'unexpected {extra}, wrong shape {[(k, shapes[k], expected[k]) for k in wrong]}')

    _check_loads(ref)

    summary_path = find_summary(folder)
    summary = read_summary(summary_path) if summary_path else None
    if summary_path is None:
        _logger.warning('no summary.json in %s or its parent: the card will say there are no eval results', folder)
    checkpoint = 'last' if folder.name == 'last' else 'best'
    ignored = sorted(p.name for p in folder.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME))
    if ignored:
        _logger.info('not published from %s: %s (only %s, %s and a generated %s are)', folder, ignored,
                     CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
    return FolderInfo(folder, config, weights, model, summary, summary_path, checkpoint, ignored)


def public_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` as published: the trainer's informational root fields (``dataset``, ``finetuned_from``)
    keep no local directory layout, and ``model_args`` holds no ``num_classes`` (folders saved before
    0.1.0's fix had one, which transformers' TimmWrapper passes twice). Otherwise fields timm reads are
    never changed.

    Args:
        config: the folder's ``config.json``.

    Returns:
        The config to upload.
    """
    out = dict(config)
    if 'num_classes' in (config.get('model_args') or {}):  # equal to the root's: inspect_folder checked it
        out['model_args'] = {k: v for k, v in config['model_args'].items() if k != 'num_classes'}
    for key, value in config.items():
        if key not in _TIMM_KEYS and isinstance(value, str) and scrub_paths(value) != value:
            out[key] = scrub_paths(value)
            _logger.info('config.json %s: published as %r (local path shortened)', key, out[key])
    return out


def write_repo_folder(info: FolderInfo, dst: Path, card_text: str | None) -> List[str]:
    """Write the files to upload into the empty folder ``dst``.

    Args:
        info: the inspected folder.
        dst: an empty folder.
        card_text: the model card (None: no card is written, an existing one on the Hub is kept).

    Returns:
        The names of the files written.
    """
    (dst / CONFIG_NAME).write_text(json.dumps(public_config(info.config), indent=2), encoding='utf-8')
    shutil.copyfile(info.weights, dst / WEIGHTS_NAME)
    if card_text is not None:
        (dst / CARD_NAME).write_text(card_text, encoding='utf-8')
    return sorted(p.name for p in dst.iterdir())


def _write_dry_run(info: FolderInfo, out_dir: Path, card_text: str) -> List[str]:
    """Write the repo contents to ``out_dir`` atomically (beside it, then renamed); never over existing files."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PushError('{0} {path} exists and is not an empty folder; choose a new or empty one', 'out_dir',
                        path=str(out_dir))
    tmp = temp_dir_beside(out_dir)  # the mode a plain mkdir gives, not mkdtemp's 0700
    try:
        files = write_repo_folder(info, tmp, card_text)
        files_like_folder(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def push(
        folder: str | os.PathLike,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        overwrite_card: bool = False,
        dry_run: bool = False,
        out_dir: str | os.PathLike | None = None,
        license: str | None = None,
        base_model: str | None = None,
        dataset: str | None = None,
        api: HfApi | None = None,
) -> PushResult:
    """Publish ``folder`` (a run's ``best/`` or ``last/``) to ``repo_id`` on the Hub.

    Uploads ``config.json``, ``model.safetensors`` and a generated ``README.md`` card in one commit,
    creating the repo if needed. An existing card on the Hub is kept unless ``overwrite_card``.
    ``dry_run`` writes the exact upload to ``out_dir`` and touches no network. The token comes from
    ``token``, else ``HF_TOKEN`` or ``huggingface_hub`` login; it is passed to the API and never logged.

    Args:
        folder: the folder to publish.
        repo_id: ``<namespace>/<name>`` on the Hub.
        token: a Hub token (None: ``HF_TOKEN`` or the login).
        private: create the repo private.
        revision: the branch to commit to.
        create_pr: open a pull request instead of committing.
        commit_message: the commit message (None: a generated one).
        overwrite_card: replace a card that is already on the Hub.
        dry_run: write the upload to ``out_dir`` only.
        out_dir: where a dry run writes (required with ``dry_run``; a new or empty folder).
        license: overrides the card's license.
        base_model: overrides the card's base model.
        dataset: overrides the card's dataset.
        api: the ``HfApi`` to call (None: a new one; tests pass a recorder).

    Returns:
        What was uploaded (or would be), the card's fate and the commit or PR URL.

    Raises:
        PushError: bad input, found before anything is uploaded.
    """
    from .. import __version__

    check_repo_id(repo_id)
    if dry_run and out_dir is None:
        raise PushError('a dry run writes what would be uploaded to {0}; pass one', 'out_dir')
    info = inspect_folder(folder)
    try:
        card = build_card(info.config, repo_id=repo_id, model=info.model, summary=info.summary,
                          checkpoint=info.checkpoint, license=license, base_model=base_model, dataset=dataset)
    except OptionError as e:  # dataset or base_model contradicting the run's records
        raise PushError(e.template, *e.options, **e.values) from None
    card_text = str(card)
    entry = registry_entry(info.config, repo_id)
    token = token or get_token()
    if token:
        # last guard: the token must not be published, whichever field of the run it slipped into
        if token in card_text:
            card_text = card_text.replace(token, '<redacted>')
        if token.encode() in (info.folder / CONFIG_NAME).read_bytes():
            raise PushError(f'{info.folder / CONFIG_NAME} contains your Hub token; remove it before publishing')

    if dry_run:
        out = Path(out_dir)
        files = _write_dry_run(info, out, card_text)
        _logger.info('dry run: wrote %s to %s (nothing uploaded)', files, out)
        return PushResult(repo_id, files, 'written', True, out_dir=out, registry_entry=entry,
                          architecture=info.config['architecture'])

    if token is None and api is None:
        raise PushError('no Hugging Face token: pass {0}, set HF_TOKEN, or log in with `hf auth login`', 'token')
    api = api if api is not None else HfApi(library_name='timm_dropres', library_version=__version__)
    commit_message = commit_message or f'Upload {info.config["architecture"]} (timm-dropres {__version__})'

    _logger.info('creating %s repo %s if needed', 'private' if private else 'public', repo_id)
    repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    repo_id = getattr(repo_url, 'repo_id', None) or repo_id
    if revision and not revision.startswith('refs/'):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    has_card = api.file_exists(repo_id, CARD_NAME, revision=revision, token=token)
    if has_card and not overwrite_card:
        _logger.info('%s already has a %s: keeping it (pass --overwrite-card to replace it)', repo_id, CARD_NAME)
    card_state = 'kept' if has_card and not overwrite_card else ('overwritten' if has_card else 'written')
    with tempfile.TemporaryDirectory(prefix='dropres-push-') as tmp:
        files = write_repo_folder(info, Path(tmp), None if card_state == 'kept' else card_text)
        _logger.info('uploading %s to %s%s%s', files, repo_id, f'@{revision}' if revision else '',
                     ' as a pull request' if create_pr else '')
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                   commit_message=commit_message, token=token)
    result = PushResult(repo_id, files, card_state, False, commit_url=getattr(commit, 'commit_url', None),
                        pr_url=getattr(commit, 'pr_url', None), registry_entry=entry,
                        architecture=info.config['architecture'])
    _logger.info('published %s: %s', repo_id, result.pr_url or result.commit_url or '(no commit url)')
    return result
