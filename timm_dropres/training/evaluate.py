"""Evaluation shared by the trainer and ``dropres-validate``: top-1, top-5, loss, per-class accuracy.

Per-sample results (loss, correct@1, correct@5, target) are gathered with accelerate's
``gather_for_metrics``, which drops the samples that even batching duplicated on the last step, so
every validation sample counts exactly once however many processes run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import SafetensorError

from ..files import write_json_atomic
from ..models.reference import ModelRef
from .build import check_model, in_chans_of
from .config import OptionError, ValidateConfig
from .data import DataError, TransformedDataset, eval_loader, iterate, resolve_data, resolve_transforms
from .runs import model_load_error

__all__ = ['EvalResult', 'evaluate', 'ValidateConfig', 'resolve_validate_model', 'validate', 'format_results']

_logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    num_samples: int
    per_class_accuracy: Dict[str, float] = field(default_factory=dict)
    per_class_count: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The result as a JSON-able dict.

        Returns:
            Every field by name.
        """
        return asdict(self)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Any,
        *,
        accelerator: Any = None,
        label_names: Sequence[str] | None = None,
        num_classes: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``loader`` (prepared by ``accelerator`` when one is given).

    Accuracies are percentages; ``loss`` is the mean cross-entropy over all samples.

    Args:
        model: the model (put in eval mode here, and back afterwards).
        loader: batches of ``(images, targets)``.
        accelerator: the run's accelerate ``Accelerator``: results are gathered from every process, each
            sample once (None: one process).
        label_names: class names for the per-class accuracy (None: class indices).
        num_classes: the class count for per-class counts (None: from ``label_names`` or the logits).

    Returns:
        Top-1, top-5, loss, the sample count and the per-class accuracy.
    """
    was_training = model.training
    model.eval()
    losses, c1s, c5s, tgts = [], [], [], []
    # autocast explicitly: an EMA copy is not wrapped by accelerator.prepare
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    for images, targets in iterate(loader):  # a Ctrl-C while its workers fork is not lost
        if accelerator is None:
            device = next(model.parameters()).device
            images, targets = images.to(device), targets.to(device)
        with autocast():
            logits = model(images).float()
        loss = F.cross_entropy(logits, targets, reduction='none')
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(targets[:, None])
        c1, c5 = hit[:, 0], hit.any(dim=1)
        if accelerator is not None:
            loss, c1, c5, targets = accelerator.gather_for_metrics((loss, c1, c5, targets))
        losses.append(loss.cpu())
        c1s.append(c1.cpu())
        c5s.append(c5.cpu())
        tgts.append(targets.cpu())
    model.train(was_training)
    loss_all, c1_all, c5_all, t_all = (torch.cat(x) for x in (losses, c1s, c5s, tgts))
    n = int(t_all.numel())
    if n == 0:
        raise ValueError('evaluation saw no samples; is the validation set empty?')
    n_cls = num_classes or (len(label_names) if label_names else int(t_all.max()) + 1)
    names = list(label_names) if label_names else [str(i) for i in range(n_cls)]
    count = torch.bincount(t_all, minlength=n_cls)
    correct = torch.bincount(t_all, weights=c1_all.double(), minlength=n_cls)
    per_class_acc = {names[i]: 100.0 * float(correct[i] / count[i]) for i in range(n_cls) if count[i] > 0}
    per_class_n = {names[i]: int(count[i]) for i in range(n_cls) if count[i] > 0}
    return EvalResult(
        top1=100.0 * float(c1_all.double().mean()),
        top5=100.0 * float(c5_all.double().mean()),
        loss=float(loss_all.double().mean()),
        num_samples=n,
        per_class_accuracy=per_class_acc,
        per_class_count=per_class_n,
    )


def format_results(result: EvalResult, title: str = '') -> str:
    """A plain-text table: overall metrics, then accuracy per class.

    Args:
        result: what :func:`evaluate` returned.
        title: an optional first line.

    Returns:
        The table.
    """
    lines = [title] if title else []
    lines.append(f'top-1 {result.top1:6.2f} %   top-5 {result.top5:6.2f} %   loss {result.loss:.4f}   '
                 f'({result.num_samples} images)')
    if result.per_class_accuracy:
        width = max(len(k) for k in result.per_class_accuracy)
        lines.append(f'{"class":<{width}}  top-1 %   images')
        for name, acc in result.per_class_accuracy.items():
            lines.append(f'{name:<{width}}  {acc:7.2f}   {result.per_class_count[name]:6d}')
    return '\n'.join(lines)


def resolve_validate_model(cfg: ValidateConfig) -> ModelRef:
    """Parse ``cfg.model`` once and run the checks that need the registry or the file system.

    Args:
        cfg: the options of ``dropres-validate``.

    Returns:
        The parsed model reference.

    Raises:
        OptionError: an unknown model or tag, or a folder timm cannot build; or ``results_file`` exists and
            ``overwrite`` is off.
        ValueError: a model string timm cannot parse.
        FileNotFoundError: a ``local-dir:`` folder that does not exist or has no ``config.json``.
    """
    if cfg.results_file and os.path.exists(cfg.results_file) and not cfg.overwrite:
        raise OptionError('{0} {path} exists; set {1} to replace it', 'results_file', 'overwrite',
                          path=cfg.results_file)
    ref = ModelRef.parse(cfg.model)
    check_model(ref)
    return ref


def validate(cfg: ValidateConfig, *, ref: ModelRef | None = None) -> Dict[str, Any]:
    """Build the model and the data split named by ``cfg`` and evaluate it.

    Args:
        cfg: the validated options (``dropres-validate``'s flags).
        ref: ``cfg.model`` parsed and checked (:func:`resolve_validate_model`), when the caller has done so
            already (the CLI); None: it is done here.

    Returns:
        The metrics (top-1, top-5, loss, per-class accuracy) with the model, data and input size.

    Raises:
        FileExistsError: ``results_file`` exists and ``overwrite`` is off.
        ValueError: the model does not fit the data (channels, classes).
    """
    if ref is None:
        ref = resolve_validate_model(cfg)
    label_names = ref.label_names
    model_kwargs: Dict[str, Any] = {}
    is_folder = ref.is_folder
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    data = resolve_data(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, split=cfg.split,
                        val_subset=cfg.val_subset, seed=cfg.seed, class_names=label_names)
    if not is_folder:
        model_kwargs['num_classes'] = cfg.num_classes or (None if cfg.pretrained else data.num_classes)
        model_kwargs['in_chans'] = data.in_chans
    model_kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    pretrained = ref.loads_weights(cfg.pretrained)
    try:
        model = timm.create_model(cfg.model, pretrained=pretrained, **model_kwargs)
    except (TypeError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:  # see runs.model_load_error
        raise model_load_error(cfg.model, e) from e
    model_in_chans = in_chans_of(model)
    if model_in_chans != data.in_chans:
        raise ValueError(f'{cfg.model} takes {model_in_chans}-channel input but {cfg.dataset} has {data.in_chans}')
    if model.num_classes < data.num_classes:
        raise ValueError(f'{cfg.model} has {model.num_classes} classes but {cfg.dataset} has {data.num_classes}')
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, eval_tf, data_cfg = resolve_transforms(model, data.in_chans, img_size=cfg.img_size, crop_pct=cfg.crop_pct)
    loader = eval_loader(TransformedDataset(data.val, None if data.preprocessed else eval_tf), cfg.batch_size,
                         num_workers=cfg.num_workers)
    model, loader = accelerator.prepare(model, loader)
    result = evaluate(model, loader, accelerator=accelerator, label_names=data.label_names,
                      num_classes=model.num_classes if label_names is None else len(label_names))
    if result.num_samples != len(data.val):  # every image counts exactly once (never a substitute)
        raise DataError(f'evaluated {result.num_samples} images, but the split has {len(data.val)}')
    out = dict(model=cfg.model, dataset=cfg.dataset, split=cfg.split, data=data.description,
               input_size=list(data_cfg['input_size']), num_processes=accelerator.num_processes, **result.to_dict())
    if accelerator.is_main_process:
        print(format_results(result, f'{cfg.model} on {data.description}'))
        if cfg.results_file:
            write_json_atomic(cfg.results_file, out)
    return out
