"""The Hub model card (``README.md``) of a fine-tuned dropres folder.

Metadata goes through ``huggingface_hub``'s ``ModelCardData``/``EvalResult`` so the Hub parses the
``model-index`` exactly as written; the body is plain Markdown built here because timm's
``generate_readme`` has no place for dropout placement, recipe or eval tables.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import OptionError
from ..models.convert import dropout_args
from ..models.layers import AFTER_LAST_BN, BEFORE_LAST_CONV, HEAD_BEFORE_POOL
from ..models.reference import ModelRef
from ..models.summary import describe

__all__ = [
    'TAGS', 'PAPER_BIBTEX', 'SUMMARY_NAME', 'find_summary', 'read_summary', 'eval_metrics', 'base_model_id',
    'dataset_id', 'run_dataset', 'weights_metrics', 'build_card', 'plain_timm_snippet', 'dropres_snippet', 'redact',
    'scrub_paths', 'transformers_snippet', 'transformers_plain_snippet',
]

TAGS = ['image-classification', 'timm', 'dropres']
SUMMARY_NAME = 'summary.json'
PAPER_URL = 'https://arxiv.org/abs/2302.06112'
PAPER_BIBTEX = """@inproceedings{kim2023dropout,
  title     = {How to Use Dropout Correctly on Residual Networks with Batch Normalization},
  author    = {Kim, Bum Jun and Choi, Hyeyeon and Jang, Hyeonah and Lee, Donggeon and Kim, Sang Woo},
  booktitle = {Proceedings of the Thirty-Ninth Conference on Uncertainty in Artificial Intelligence (UAI)},
  series    = {Proceedings of Machine Learning Research},
  volume    = {216},
  pages     = {1058--1067},
  year      = {2023},
  publisher = {PMLR},
  eprint    = {2302.06112},
  archivePrefix = {arXiv},
}"""

_POSITION_TEXT = {
    AFTER_LAST_BN: 'after the last BatchNorm of the residual branch, before the addition of the shortcut',
    BEFORE_LAST_CONV: 'after the BatchNorm + activation that precede the last convolution of the residual branch',
    HEAD_BEFORE_POOL: 'on the final feature map, before global average pooling',
}
# dataset names the trainer understands -> Hub dataset ids, for the card's `datasets` metadata
_HUB_DATASETS = {
    'fashion_mnist': 'zalando-datasets/fashion_mnist', 'fashion-mnist': 'zalando-datasets/fashion_mnist',
    'fmnist': 'zalando-datasets/fashion_mnist', 'torch/fashion_mnist': 'zalando-datasets/fashion_mnist',
    'torch/cifar10': 'uoft-cs/cifar10', 'cifar10': 'uoft-cs/cifar10',
    'torch/cifar100': 'uoft-cs/cifar100', 'cifar100': 'uoft-cs/cifar100',
}
_SECRET_KEY = re.compile(r'token|secret|password|passwd|api_?key|credential|auth', re.IGNORECASE)
_SECRET_VALUE = re.compile(r'\bhf_[A-Za-z0-9]{20,}')  # a Hugging Face access token, whatever its key
# an absolute local path (POSIX, ~ or Windows) inside a string: published as ``.../<last part>``
_ABS_PATH = re.compile(r'(?<![\w.])(?:~|[A-Za-z]:)?[\\/](?:[^\s\\/()\'",]+[\\/])*([^\s\\/()\'",]+)')
# trainer options about the machine or the run's bookkeeping, not the recipe
_RUNTIME_KEYS = frozenset((
    'cpu', 'num_workers', 'output_dir', 'overwrite', 'resume', 'checkpoint_every', 'keep_checkpoints',
    'stop_after_steps', 'log_with', 'log_every', 'progress', 'data_dir', 'download', 'pretrained_file',
    'initial_checkpoint', 'torchcompile', 'grad_checkpointing'))
# datasets whose validation in the trainer is the official test split
_TEST_SPLIT = frozenset(('zalando-datasets/fashion_mnist', 'uoft-cs/cifar10', 'uoft-cs/cifar100'))


# ---------------------------------------------------------------------------------------------- summary.json
def find_summary(folder: str | os.PathLike) -> Path | None:
    """Find the run summary of a saved folder.

    Args:
        folder: a run's ``best/`` or ``last/`` folder, or any saved folder.

    Returns:
        ``summary.json`` in ``folder`` or one level up (``runs/x/best`` -> ``runs/x/summary.json``), or None.
    """
    folder = Path(folder)
    for cand in (folder / SUMMARY_NAME, folder.parent / SUMMARY_NAME):
        if cand.is_file():
            return cand
    return None


def read_summary(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a trainer ``summary.json``.

    Args:
        path: the file.

    Returns:
        The summary.

    Raises:
        ValueError: the file is not JSON or does not hold an object.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} must hold a JSON object (the trainer\'s run summary), got {type(data).__name__}')
    return data


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def eval_metrics(summary: Mapping[str, Any], checkpoint: str = 'best') -> Dict[str, Any]:
    """``top1``/``top5``/``loss``/``epoch``/``num_samples`` (those present) of ``checkpoint`` ('best' or 'last').

    Reads the trainer's ``{"best": {"top1": ...}, "last": {...}, "epochs_completed": n}``. Accuracies are
    percentages, as timm reports them.

    Args:
        summary: the trainer's ``summary.json``.
        checkpoint: ``'best'`` or ``'last'``.

    Returns:
        The metrics that are present and finite.
    """
    if checkpoint not in ('best', 'last'):
        raise ValueError(f'checkpoint must be "best" or "last", got {checkpoint!r}')
    nested = summary.get(checkpoint) if isinstance(summary.get(checkpoint), Mapping) else {}
    out: Dict[str, Any] = {}
    for key in ('top1', 'top5', 'loss', 'epoch', 'num_samples'):
        value = _num(nested.get(key))
        if value is not None:
            out[key] = int(value) if key in ('epoch', 'num_samples') else value
    if out and checkpoint == 'last' and 'epoch' not in out and _num(summary.get('epochs_completed')) is not None:
        out['epoch'] = int(summary['epochs_completed'])
    if out and nested.get('weights') in ('model', 'ema'):
        out['weights'] = nested['weights']
    return out


def weights_metrics(config: Mapping[str, Any], summary: Mapping[str, Any] | None, checkpoint: str) -> Dict[str, Any]:
    """Eval results of the published weights: from the summary, else the ``metrics`` the trainer put in config.json.

    Args:
        config: the folder's ``config.json``.
        summary: the trainer's ``summary.json``, or None.
        checkpoint: ``'best'`` or ``'last'``.

    Returns:
        The metrics (see :func:`eval_metrics`); empty when neither source has any.
    """
    if summary:
        m = eval_metrics(summary, checkpoint)
        if m:
            return m
    cm = config.get('metrics') if isinstance(config.get('metrics'), Mapping) else {}
    m = eval_metrics({checkpoint: cm}, checkpoint)
    if m and config.get('weights') in ('model', 'ema'):
        m['weights'] = config['weights']
    return m


def summary_config(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """The run's options as the summary records them.

    Args:
        summary: the trainer's ``summary.json``.

    Returns:
        Its ``config`` mapping (empty when there is none).
    """
    cfg = summary.get('config') or {}
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def scrub_paths(text: str) -> str:
    """Cut every absolute local path in ``text`` to ``.../<last part>`` (no local layout on the Hub).

    Args:
        text: any text.

    Returns:
        The text with the paths cut.
    """
    return _ABS_PATH.sub(r'.../\1', text)


def redact(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Scalar recipe fields fit for a public card: secrets dropped, local paths cut to their last part.

    Args:
        config: the run's options.

    Returns:
        The fields to show.
    """
    out = {}
    for k, v in config.items():
        if _SECRET_KEY.search(str(k)) or k in _RUNTIME_KEYS or v is None or v == '' or isinstance(v, Mapping):
            continue
        if isinstance(v, (list, tuple)):
            if not all(isinstance(x, (int, float, str, bool)) for x in v) or len(v) > 8:
                continue
            v = ', '.join(str(x) for x in v)
        elif not isinstance(v, (int, float, str, bool)):
            continue
        if isinstance(v, str) and _SECRET_VALUE.search(v):
            continue
        out[str(k)] = scrub_paths(v) if isinstance(v, str) else v
    return out


def base_model_id(summary: Mapping[str, Any] | None) -> str | None:
    """Hub id of the weights the run started from, when the summary says it started from pretrained weights.

    Args:
        summary: the trainer's ``summary.json``, or None.

    Returns:
        The Hub repo id, or None (trained from scratch, from a local file or folder, or unknown).
    """
    if not summary:
        return None
    cfg = summary_config(summary)
    name = cfg.get('model') or summary.get('model')
    if not isinstance(name, str) or not cfg.get('pretrained', summary.get('pretrained', False)):
        return None
    if cfg.get('pretrained_file'):
        return None  # started from a local weights file: no Hub id to point at
    try:
        ref = ModelRef.parse(name, read_folder=False)  # the run's folder need not exist here
    except ValueError:  # a bare Hub id, which timm no longer takes without hf-hub:
        return name[len('timm/'):] if name.startswith('timm/') else None
    if ref.source is not None:
        return ref.hub_id  # None for a folder
    from timm.models import get_pretrained_cfg  # lazy: only needed for registry names
    tag = cfg.get('pretrained_tag')
    pcfg = get_pretrained_cfg(f'{name}.{tag}' if tag and not ref.tag else name, allow_unregistered=True)
    return pcfg.hf_hub_id if pcfg is not None and pcfg.hf_hub_id else None


def _is_folder(name: Any) -> bool:
    """Whether a recorded model name is a saved folder (``local-dir:``), which holds starting weights."""
    try:
        return isinstance(name, str) and ModelRef.parse(name, read_folder=False).is_folder
    except ValueError:
        return False


def dataset_id(name: Any) -> Tuple[str | None, str | None]:
    """The Hub dataset and a readable name of a trainer ``dataset`` value.

    Args:
        name: the value.

    Returns:
        ``(Hub dataset id or None, readable name or None)``; a local folder gives its last part only.
    """
    if not isinstance(name, str) or not name:
        return None, None
    key = name.lower()
    if key in _HUB_DATASETS:
        return _HUB_DATASETS[key], name
    if key.startswith('hfds/'):
        return name[len('hfds/'):], name
    return None, re.split(r'[\\/]', scrub_paths(name).rstrip('/\\'))[-1] or name  # local data: a name only


def run_dataset(config: Mapping[str, Any], summary: Mapping[str, Any] | None) -> Any:
    """The run's ``dataset`` value: from the summary's config, else the ``dataset`` the trainer put in config.json.

    Args:
        config: the folder's ``config.json``.
        summary: the trainer's ``summary.json``, or None.

    Returns:
        The value, or None.
    """
    return summary_config(summary or {}).get('dataset') or (summary or {}).get('dataset') or config.get('dataset')


# ---------------------------------------------------------------------------------------------- usage snippets
_DROPOUT_ARG_NAMES = ('drop_rate', 'res_drop_rate', 'res_drop_pos')


def plain_timm_snippet(repo_id: str, architecture: str) -> str:
    """Python that loads the published weights into plain timm's base architecture (no timm_dropres).

    The call is the README's "without the plugin" call, with the folder downloaded from the Hub.

    Args:
        repo_id: the Hub repo.
        architecture: the ``*_dropres`` architecture (named in a comment).

    Returns:
        The code.
    """
    base = architecture.removesuffix('_dropres')
    return f"""import json

import timm  # plain timm: timm_dropres is not needed
from huggingface_hub import snapshot_download

folder = snapshot_download('{repo_id}')
cfg = json.load(open(f'{{folder}}/config.json'))
model = timm.create_model(
    cfg['architecture'].removesuffix('_dropres'),  # '{base}': dropout has no weights, so every tensor fits
    pretrained=True, pretrained_cfg_overlay=dict(cfg['pretrained_cfg'], file=f'{{folder}}/model.safetensors'),
    **{{k: v for k, v in cfg['model_args'].items() if k not in {_DROPOUT_ARG_NAMES!r}}},
).eval()  # eval outputs are bit-identical to the dropres model's; the preprocessing is the published one
"""


def dropres_snippet(repo_id: str) -> str:
    """Python that rebuilds the published model with its dropouts (timm + the timm_dropres plugin).

    Args:
        repo_id: the Hub repo.

    Returns:
        The code.
    """
    return f"""import timm
import timm_dropres  # noqa: F401  (registers the *_dropres models)

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
print(timm_dropres.describe(model))  # where the dropouts sit (active in train mode only)
data_cfg = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_cfg, is_training=False)
"""


def transformers_snippet(repo_id: str) -> str:
    """Python that loads the published model with transformers' ``AutoModelForImageClassification``.

    Args:
        repo_id: the Hub repo.

    Returns:
        The code.
    """
    return f"""import timm_dropres  # noqa: F401  (registers the *_dropres models, which transformers builds with timm)
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained('{repo_id}').eval()  # labels: model.config.id2label
processor = AutoImageProcessor.from_pretrained('{repo_id}')  # the published preprocessing
"""


def transformers_plain_snippet(repo_id: str, config: Mapping[str, Any]) -> str:
    """Python that loads the published weights with transformers into timm's base architecture (no timm_dropres).

    Args:
        repo_id: the Hub repo.
        config: its ``config.json`` (architecture and ``model_args``).

    Returns:
        The code.
    """
    base = str(config['architecture']).removesuffix('_dropres')
    args = {k: v for k, v in (config.get('model_args') or {}).items()
            if k not in _DROPOUT_ARG_NAMES and k != 'num_classes'}
    return f"""from transformers import AutoModelForImageClassification

# without the plugin: build timm's own {base} (dropout has no weights) instead of the unregistered dropres name
model = AutoModelForImageClassification.from_pretrained(
    '{repo_id}', architecture='{base}', model_args={args!r}).eval()
"""


# ---------------------------------------------------------------------------------------------- card
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f'{v:.4g}' if abs(v) < 1e-2 and v != 0 else f'{v:.4f}'.rstrip('0').rstrip('.')
    return str(v).replace('|', '\\|').replace('\n', ' ')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(_fmt(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def _epoch_rows(summary: Mapping[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    epochs = summary.get('history') or []
    if not isinstance(epochs, list) or not epochs or not all(isinstance(e, Mapping) for e in epochs):
        return [], []
    keys: List[str] = []
    for e in epochs:
        keys += [k for k, v in e.items() if k not in keys and _num(v) is not None]
    return keys, [[e.get(k, '') for k in keys] for e in epochs]


def _eval_results(m: Mapping[str, Any], ds_id: str | None, ds_name: str | None, split: str) -> List[EvalResult]:
    common = dict(task_type='image-classification', task_name='Image Classification',
                  dataset_type=ds_id or 'imagefolder', dataset_name=ds_name or ds_id or 'unknown',
                  dataset_split=split)
    out = []
    if 'top1' in m:
        out.append(EvalResult(metric_type='accuracy', metric_name='top-1 accuracy', metric_value=m['top1'], **common))
    if 'top5' in m:
        out.append(EvalResult(metric_type='top_5_accuracy', metric_name='top-5 accuracy', metric_value=m['top5'],
                              **common))
    return out


#: huggingface_hub renders the YAML header from the card data; the body is inserted as a value, verbatim
_TEMPLATE = '---\n{{ card_data }}\n---\n\n{{ body }}'


def build_card(
        config: Mapping[str, Any],
        *,
        repo_id: str,
        model: nn.Module,
        summary: Mapping[str, Any] | None = None,
        checkpoint: str = 'best',
        license: str | None = None,
        base_model: str | None = None,
        dataset: str | None = None,
) -> ModelCard:
    """The model card of a dropres folder.

    Args:
        config: the folder's ``config.json``.
        repo_id: the Hub repo the card is for.
        model: that config rebuilt (any device, e.g. meta), so the placement table comes from the network itself.
        summary: the trainer's ``summary.json`` (None: the card says there are no eval results).
        checkpoint: which of its results the weights are (``'best'`` or ``'last'``).
        license: overrides the license the config and summary give.
        base_model: the Hub id of the starting weights, for a run that recorded them only as a local file;
            otherwise it must agree with the run's records.
        dataset: names the data of a run that recorded none (the card then carries no results); otherwise
            it must agree with the run's records, since the card's results are the run's.

    Returns:
        The card (``huggingface_hub.ModelCard``).

    Raises:
        OptionError: ``dataset`` or ``base_model`` contradicts the run's records.
    """
    arch = str(config['architecture'])
    base_arch = arch[:-len('_dropres')] if arch.endswith('_dropres') else arch
    pcfg = dict(config.get('pretrained_cfg') or {})
    args = dropout_args(model)
    recorded = run_dataset(config, summary)
    same = (dataset_id(dataset)[0] or dataset_id(dataset)[1]) == (dataset_id(recorded)[0] or dataset_id(recorded)[1]) \
        if dataset is not None and recorded is not None else True
    if not same:
        # the card's results are the run's: they may name only the data the run recorded
        raise OptionError('{0} {value!r}: the run\'s records say it trained and was evaluated on {recorded!r}, and '
                          'the card\'s dataset and results come from those records; drop {0}', 'dataset',
                          value=dataset, recorded=dataset_id(recorded)[0] or dataset_id(recorded)[1])
    ds_id, ds_name = dataset_id(dataset or recorded)
    if base_model is not None and summary:  # likewise the starting weights: never another than the run's
        cfg = summary_config(summary)
        started = cfg.get('pretrained') or cfg.get('pretrained_file') or cfg.get('initial_checkpoint') or \
            _is_folder(cfg.get('model'))
        if not started:
            raise OptionError('{0} {value!r}: the run\'s records say it trained from random initialisation, not '
                              'from weights; drop {0}', 'base_model', value=base_model)
        if base_model_id(summary) not in (None, base_model):
            raise OptionError('{0} {value!r}: the run\'s records say it started from {recorded!r}; drop {0}',
                              'base_model', value=base_model, recorded=base_model_id(summary))
    base_model = base_model or base_model_id(summary)
    license = license or pcfg.get('license') or 'unknown'
    split = 'test' if ds_id in _TEST_SPLIT else 'validation'
    metrics = weights_metrics(config, summary, checkpoint)
    # no record of the data: the metrics are not attached to a dataset the user only named
    results = _eval_results(metrics, ds_id, ds_name, split) if recorded is not None else []
    data = ModelCardData(
        library_name='timm', pipeline_tag='image-classification', tags=list(TAGS), license=license,
        datasets=[ds_id] if ds_id else None, base_model=base_model,
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=repo_id if results else None, eval_results=results or None,
    )

    name = repo_id.split('/')[-1]
    n_params = sum(p.numel() for p in model.parameters())
    labels = config.get('label_names')
    if base_model:
        origin = f'fine-tuned from [`{base_model}`](https://huggingface.co/{base_model})'
    elif summary:
        origin = 'trained from scratch (its run summary records no pretrained starting point)'
    else:
        origin = 'from a run whose summary was not published'
    parts = [f'# {name}', '',
             f'`{arch}`: timm\'s `{base_arch}` with dropout placed where Kim et al. (UAI 2023, '
             f'[arXiv:2302.06112]({PAPER_URL})) show it belongs, {origin}'
             + (f' on {ds_name}.' if ds_name else '.') + ' Published with the timm-dropres plugin.', '',
             '## Model details', '',
             _table(['field', 'value'], [
                 ['architecture', f'`{arch}` (base: `{base_arch}`)'],
                 ['parameters', f'{n_params / 1e6:.2f} M'],
                 ['classes', config.get('num_classes')],
                 ['input size', 'x'.join(str(s) for s in pcfg.get('input_size', []))],
                 ['mean / std', f'{pcfg.get("mean")} / {pcfg.get("std")}'],
                 ['crop', f'{pcfg.get("crop_pct")} ({pcfg.get("crop_mode", "center")}), '
                          f'{pcfg.get("interpolation")} interpolation'],
                 ['license', license],
             ])]
    if isinstance(labels, list) and labels:
        shown = ', '.join(f'`{lbl}`' for lbl in labels[:20])
        shown += f', ... ({len(labels)} in all)' if len(labels) > 20 else ''
        parts += ['', f'Labels: {shown}.']

    parts += ['', '## Where the dropouts sit', '',
              _table(['dropout', 'rate', 'position'], [
                  ['one per residual block (`res_drop_rate`)', args['res_drop_rate'],
                   f'`{args["res_drop_pos"]}`: {_POSITION_TEXT[args["res_drop_pos"]]}'],
                  ['head (`drop_rate`)', args['drop_rate'],
                   f'`{HEAD_BEFORE_POOL}`: {_POSITION_TEXT[HEAD_BEFORE_POOL]}'],
              ]), '',
              'The paper\'s two guidelines: one dropout per residual branch after its last BatchNorm (so no BatchNorm '
              'sees the variance shift that dropout causes in training), and the head dropout before global pooling '
              '(the pooling averages the noise down). Dropout has no parameters and is the identity in eval mode, so '
              f'these weights give the same eval outputs in plain timm `{base_arch}` (see below).', '',
              '```text', describe(model), '```']

    parts += ['', '## Training recipe', '']
    if summary:
        recipe = redact(summary_config(summary))
        facts = dict(summary)
        facts.update({k: v for k, v in (summary.get('throughput') or {}).items() if k == 'train_img_per_s'})
        for key in ('train_size', 'val_size', 'epochs_completed', 'num_processes', 'train_img_per_s', 'wall_time_s'):
            if _num(facts.get(key)) is not None:
                recipe[key] = round(facts[key], 1) if isinstance(facts[key], float) else facts[key]
        versions = summary.get('versions')
        if isinstance(versions, Mapping):
            recipe.update({f'version: {k}': v for k, v in redact(versions).items()})
        parts.append(_table(['setting', 'value'], sorted(recipe.items())) if recipe else
                     'The run summary records no configuration.')
    else:
        parts.append('No run summary (`summary.json`) was published with these weights, so the recipe is unknown.')

    parts += ['', '## Evaluation', '']
    rows = []
    for ck in ('best', 'last'):
        m = (eval_metrics(summary, ck) if summary else {}) or (metrics if ck == checkpoint else {})
        if m:
            label = ck + (' (these weights)' if ck == checkpoint else '')
            label += ' [EMA]' if m.get('weights') == 'ema' else ''
            rows.append([label, m.get('epoch', ''), m.get('top1', ''), m.get('top5', ''), m.get('loss', ''),
                         m.get('num_samples', summary.get('val_size', '') if summary else '')])
    if rows:
        parts += [f'On the {split} split of {ds_name or "the fine-tuning dataset"} (accuracy in %'
                  + ('; [EMA]: the exponential moving average of the weights' if '[EMA]' in str(rows) else '')
                  + '):', '', _table(['checkpoint', 'epoch', 'top-1', 'top-5', 'loss', 'images'], rows)]
        keys, erows = _epoch_rows(summary or {})
        if erows:
            parts += ['', '<details><summary>Per-epoch metrics</summary>', '', _table(keys, erows), '', '</details>']
    else:
        parts.append('No evaluation results: neither a `summary.json` nor `metrics` in config.json came with the '
                     'weights.')

    parts += ['', '## Usage', '', 'With the timm-dropres plugin installed (`pip install timm-dropres`), the model is '
              'rebuilt with its dropouts (for further fine-tuning):', '',
              '```python', dropres_snippet(repo_id).rstrip(), '```', '',
              f'With plain timm only (inference or fine-tuning without dropres dropout), load the weights into '
              f'`{base_arch}`: `hf-hub:{repo_id}` itself needs the plugin, because timm knows no `{arch}`.', '',
              '```python', plain_timm_snippet(repo_id, arch).rstrip(), '```', '',
              'With transformers (`AutoModelForImageClassification`, which builds the network through timm), import '
              'the plugin first:', '', '```python', transformers_snippet(repo_id).rstrip(), '```', '',
              f'Without it, transformers stops with "The model architecture \'{arch}\' is not supported in your '
              f'version of timm ... upgrade timm". Upgrading timm does not help: `pip install timm-dropres` and '
              f'`import timm_dropres` does, or load the weights into timm\'s `{base_arch}`:', '',
              '```python', transformers_plain_snippet(repo_id, config).rstrip(), '```', '',
              '## Citation', '', '```bibtex', PAPER_BIBTEX, '```', '']
    return ModelCard.from_template(data, template_str=_TEMPLATE, body='\n'.join(parts))
