"""Transfer study: pretrain on some Fashion-MNIST classes, fine-tune on few images of the others, per placement.

This is the product's main use measured on real data: a user takes a pretrained network and fine-tunes it on a
few hundred images. One study =

1. **Pretrain once per architecture** (no dropout) on every training image of ``source_classes``, with the
   in-memory loop of :mod:`timm_dropres.research.ablation` (fast), and save the weights as safetensors.
2. **Fine-tune** through the real trainer (:func:`timm_dropres.training.trainer.finetune` with
   ``pretrained_file``) on ``shots`` images per class of ``target_classes`` for every (configuration, seed).
   The seed draws the few-shot subset and seeds the trainer (new classifier, data order, augmentation,
   dropout), identically for every configuration. The trainer validates on ``val_per_class`` further
   training images per class (disjoint from the few-shot set) for its log only: nothing is selected on them
   or on the test set.
3. **Test** the last weights on every test image of the target classes with the trainer's own eval transform
   and :func:`timm_dropres.training.evaluate.evaluate`.

Configurations are those of :data:`timm_dropres.research.ablation.CONFIGS` that the trainer can build from its
public flags: 'before_every_bn' and 'after_add' are hook-placed hazards the trainer (rightly) cannot express,
so they are refused here and measured in the from-scratch studies. Each finished run writes one JSON; a rerun
skips finished runs, and a JSON from a different specification is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..files import read_json, write_json_atomic
from ..models.layers import AUTO, check_rate
from .ablation.configs import AFTER_ADD, BEFORE_EVERY_BN, HEAD_AFTER, HEAD_BEFORE, config_rates, get_config
from .ablation.data import per_class_subset
from .ablation.placement import configs_for, resolved_position
from .ablation.spec import ArchSpec as _AblationArch
from .ablation.spec import dataclass_from_mapping, read_spec_mapping

__all__ = ['TransferArch', 'Pretrain', 'Finetune', 'TransferSpec', 'load_transfer_spec', 'TransferData',
           'load_transfer_data', 'pretrain', 'finetune_config', 'run_one', 'run_transfer', 'skipped_configs',
           'UNSUPPORTED']

_logger = logging.getLogger(__name__)

#: hook-placed hazards the trainer cannot build from its public flags
UNSUPPORTED = (BEFORE_EVERY_BN, AFTER_ADD)


@dataclass(frozen=True)
class TransferArch:
    """One architecture of a transfer study (an entry of the YAML's ``architectures`` list).

    Attributes:
        name: short unique name, used in run and weight paths and reports.
        model: the timm ``*_dropres`` model name.
        model_kwargs: extra ``timm.create_model`` keyword arguments.
        img_size: input height and width; images are resized from 28x28 to it.
        label: description shown in the report.
    """

    name: str
    model: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    img_size: int = 28
    label: str = ''

    @property
    def base(self) -> str:
        """The plain timm model (no residual dropout): what 'head_after_pool' fine-tunes with timm's drop_rate."""
        return self.model.removesuffix('_dropres')


@dataclass(frozen=True)
class Pretrain:
    """Source-task training schedule (the YAML's ``pretrain``): in-memory loop, no dropout, same for every arch.

    Attributes:
        epochs: training epochs (cosine learning-rate schedule, stepped per update).
        batch_size: batch size; the last partial batch of an epoch is dropped.
        opt: optimizer name for timm's ``create_optimizer_v2``.
        lr: peak learning rate.
        weight_decay: weight decay.
        momentum: optimizer momentum.
        seed: seed of the weights, data order and flips.
    """

    epochs: int = 3
    batch_size: int = 128
    opt: str = 'sgd'
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class Finetune:
    """Target-task fine-tuning settings (the YAML's ``finetune``), passed to the trainer for every run.

    Each field is the ``FinetuneConfig`` field of the same name (see ``finetune_config``).

    Attributes:
        epochs: fine-tuning epochs.
        batch_size: batch size.
        opt: optimizer name.
        lr: learning rate.
        weight_decay: weight decay.
        warmup_epochs: warmup length in epochs.
        smoothing: label smoothing.
        hflip: horizontal-flip probability.
        color_jitter: colour-jitter strength.
        scale: ``RandomResizedCrop`` scale range.
    """

    epochs: int = 30
    batch_size: int = 16
    opt: str = 'adamw'
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1
    smoothing: float = 0.0
    hflip: float = 0.5
    color_jitter: float = 0.0
    scale: Tuple[float, float] = (0.6, 1.0)


@dataclass(frozen=True)
class TransferSpec:
    """Everything that defines a transfer study (one YAML file); each run's fingerprint is derived from it.

    Attributes:
        architectures: the networks to pretrain and fine-tune.
        configs: configuration names (see ``ablation.get_config``); the hook-placed hazards in
            ``UNSUPPORTED`` are refused.
        seeds: seeds; each draws the few-shot subset and seeds the trainer, the same for every configuration.
        res_drop_rate: residual dropout rate (unless a configuration sets ``@<p>``).
        head_drop_rate: head dropout rate (unless a configuration sets ``@<p>``).
        source_classes: Fashion-MNIST classes of the pretraining task.
        target_classes: Fashion-MNIST classes of the fine-tuning task (disjoint from ``source_classes``).
        shots: fine-tuning images per target class.
        val_per_class: further training images per target class for the trainer's validation log.
        pretrain: the pretraining schedule.
        finetune: the fine-tuning settings.
        alpha: family-wise error rate of the Holm-corrected paired t-tests in the report.

    Raises:
        ValueError: listing every problem: no architecture or seed, an unknown or unsupported configuration,
            overlapping or invalid class lists, ``shots``/``val_per_class`` below 1; or a rate not in [0, 1).
    """

    architectures: Tuple[TransferArch, ...]
    configs: Tuple[str, ...] = ('none', 'default', 'residual', 'head_before_pool', 'head_after_pool')
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    res_drop_rate: float = 0.1
    head_drop_rate: float = 0.1
    source_classes: Tuple[int, ...] = (0, 1, 2, 3, 4)
    target_classes: Tuple[int, ...] = (5, 6, 7, 8, 9)
    shots: int = 20
    val_per_class: int = 20
    pretrain: Pretrain = Pretrain()
    finetune: Finetune = Finetune()
    alpha: float = 0.05

    def __post_init__(self) -> None:
        errors = []
        if not self.architectures:
            errors.append('architectures is empty: name at least one')
        for c in self.configs:
            try:
                cfg = get_config(c)
            except ValueError as e:
                errors.append(str(e))
                continue
            if cfg.residual in UNSUPPORTED:
                errors.append(f'configuration {c!r} is a hook-placed hazard the trainer cannot build; '
                              f'not available in the transfer study (valid: none of {list(UNSUPPORTED)})')
        if not self.seeds:
            errors.append('seeds is empty: name at least one')
        overlap = sorted(set(self.source_classes) & set(self.target_classes))
        if overlap:
            errors.append(f'source_classes and target_classes overlap: {overlap}')
        for key in ('source_classes', 'target_classes'):
            v = getattr(self, key)
            if len(v) < 2 or any(not (isinstance(c, int) and 0 <= c < 10) for c in v):
                errors.append(f'{key} must be at least two integers in 0..9, got {list(v)}')
        if self.shots < 1 or self.val_per_class < 1:
            errors.append(f'shots and val_per_class must be >= 1, got {self.shots} and {self.val_per_class}')
        if errors:
            raise ValueError('invalid transfer specification:\n  ' + '\n  '.join(errors))
        check_rate('res_drop_rate', self.res_drop_rate)
        check_rate('head_drop_rate', self.head_drop_rate)


def load_transfer_spec(path: str | os.PathLike) -> TransferSpec:
    """Read a transfer-study specification from YAML; unknown keys are errors, so a typo cannot pass silently.

    Args:
        path: the YAML file (see ``configs/study_transfer.yaml``): top-level ``TransferSpec`` fields, with
            ``architectures`` a list of ``TransferArch`` mappings and ``pretrain``/``finetune`` mappings.

    Returns:
        The validated specification.

    Raises:
        OSError: if the file cannot be read.
        yaml.YAMLError: if the file is not valid YAML.
        ValueError: if the top level is not a mapping, a key is unknown, or a value is invalid (see
            ``TransferSpec``).

    Example:
        >>> spec = load_transfer_spec('configs/study_transfer.yaml')  # doctest: +SKIP
    """
    raw = read_spec_mapping(path)
    archs = tuple(dataclass_from_mapping(TransferArch, a, f'{path}: architectures[{i}]')
                  for i, a in enumerate(raw.pop('architectures', []) or []))
    pre = dataclass_from_mapping(Pretrain, raw.pop('pretrain', {}) or {}, f'{path}: pretrain')
    ft = dict(raw.pop('finetune', {}) or {})
    if 'scale' in ft:
        ft['scale'] = tuple(ft['scale'])
    ft = dataclass_from_mapping(Finetune, ft, f'{path}: finetune')
    for key in ('configs', 'seeds', 'source_classes', 'target_classes'):
        if key in raw:
            raw[key] = tuple(raw[key])
    return dataclass_from_mapping(TransferSpec, dict(raw, architectures=archs, pretrain=pre, finetune=ft), str(path))


@dataclass
class TransferData:
    """The transfer study's data: uint8 images ``[N, 28, 28]`` and int64 labels renumbered per task.

    Attributes:
        source_x: training images of the source classes.
        source_y: their labels, ``0..k-1`` in the order of ``source_classes``.
        target_train_x: training images of the target classes (the few-shot pool).
        target_train_y: their labels, ``0..m-1`` in the order of ``target_classes``.
        test_x: test images of the target classes.
        test_y: their labels, numbered as ``target_train_y``.
        target_names: class names of the target classes, in label order.
    """

    source_x: torch.Tensor
    source_y: torch.Tensor
    target_train_x: torch.Tensor
    target_train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    target_names: List[str]


def load_transfer_data(spec: TransferSpec, root: Optional[str | os.PathLike] = None) -> TransferData:
    """Load Fashion-MNIST split into the source task (all its training images) and the target task.

    Args:
        spec: the study (its ``source_classes`` and ``target_classes``).
        root: folder holding the four idx files; None searches ``$FASHION_MNIST_DIR`` and Debian's path.

    Returns:
        The source training set, the target training pool and the target test set.

    Raises:
        FileNotFoundError: if the Fashion-MNIST idx files are not found (``FashionMNISTNotFound``).
        ValueError: if an idx file is malformed.

    Example:
        >>> data = load_transfer_data(load_transfer_spec('configs/study_transfer.yaml'))  # doctest: +SKIP
    """
    from ..training.fmnist import CLASSES, load_fashion_mnist
    from .ablation.data import select_classes

    tr_x, tr_y = load_fashion_mnist('train', root)
    te_x, te_y = load_fashion_mnist('test', root)
    sx, sy = select_classes(tr_x, tr_y, spec.source_classes)
    tx, ty = select_classes(tr_x, tr_y, spec.target_classes)
    ex, ey = select_classes(te_x, te_y, spec.target_classes)
    return TransferData(sx, sy, tx, ty, ex, ey, [CLASSES[c] for c in spec.target_classes])


def _normalize(x: torch.Tensor, img_size: int, mean: float, std: float) -> torch.Tensor:
    """uint8 ``[N, H, W]`` -> float ``[N, 1, S, S]``, resized bilinearly as the trainer's eval transform does."""
    x = x.float().div(255.0).unsqueeze(1)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False, antialias=False)
    return (x - mean) / std


def pretrain(spec: TransferSpec, arch: TransferArch, data: TransferData, out_file: Path,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train the base architecture (no dropout) on the source task and save it as safetensors.

    Normalisation uses the model's own ``pretrained_cfg`` mean/std at ``arch.img_size``, the same that the
    trainer's transforms apply during fine-tuning, so the pretrained features see the same input statistics.
    Augmentation is a random horizontal flip; the learning rate follows a cosine schedule per update.

    Args:
        spec: the study (its ``pretrain`` schedule and ``source_classes``).
        arch: the architecture, built with ``drop_rate=0.0, res_drop_rate=0.0`` and one input channel.
        data: the study's data (its ``source_x``/``source_y``).
        out_file: the ``.safetensors`` file to write (atomically; folders are created); the record goes
            to the same path with a ``.json`` suffix.
        log: called with the mean training loss after every epoch.

    Returns:
        The record: ``arch``, ``model``, ``epochs``, ``steps``, ``train_loss_last_epoch``, ``images``,
        ``img_size``, the normalisation ``mean``/``std`` and ``wall_s``.

    Raises:
        FloatingPointError: if the training loss becomes NaN or infinite.
    """
    p = spec.pretrain
    torch.manual_seed(p.seed)
    model = timm.create_model(arch.model, num_classes=len(spec.source_classes), in_chans=1, drop_rate=0.0,
                              res_drop_rate=0.0, **arch.model_kwargs)
    dcfg = timm.data.resolve_model_data_config(model)
    mean, std = float(sum(dcfg['mean']) / len(dcfg['mean'])), float(sum(dcfg['std']) / len(dcfg['std']))
    gen = torch.Generator().manual_seed(p.seed)
    n = len(data.source_x)
    steps = n // p.batch_size
    opt = create_optimizer_v2(model, opt=p.opt, lr=p.lr, weight_decay=p.weight_decay, momentum=p.momentum)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=p.epochs, step_on_epochs=False,
                                   updates_per_epoch=steps)
    t0, step, loss_sum = time.time(), 0, 0.0
    model.train()
    for epoch in range(p.epochs):
        order = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for i in range(steps):
            idx = order[i * p.batch_size:(i + 1) * p.batch_size]
            xb = _normalize(data.source_x[idx], arch.img_size, mean, std)
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = F.cross_entropy(model(xb), data.source_y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f'pretraining {arch.name}: loss {loss.item()} at step {step}')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(num_updates=step)
            loss_sum += loss.item()
        log(f'pretrain {arch.name}: epoch {epoch + 1}/{p.epochs} loss {loss_sum / steps:.4f}')
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix('.tmp')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out_file)
    rec = dict(arch=arch.name, model=arch.model, epochs=p.epochs, steps=step, train_loss_last_epoch=loss_sum / steps,
               images=n, img_size=arch.img_size, mean=mean, std=std, wall_s=round(time.time() - t0, 1))
    write_json_atomic(out_file.with_suffix('.json'), rec, indent=1, sort_keys=True)
    return rec


def finetune_config(spec: TransferSpec, arch: TransferArch, config_name: str, seed: int, weights: Path,
                    output_dir: Path) -> Any:
    """Build the trainer configuration of one fine-tuning run (the same flags a CLI user would give).

    ``'head_after_pool'`` fine-tunes the plain timm model (``arch.base``) with timm's own ``drop_rate``;
    every other configuration fine-tunes ``arch.model`` with the dropres flags.

    Args:
        spec: the study (rates and ``finetune`` settings).
        arch: the architecture.
        config_name: the configuration (see ``ablation.get_config``).
        seed: the trainer's seed.
        weights: the pretrained safetensors file (``pretrained_file``).
        output_dir: the trainer's output folder.

    Returns:
        A ``FinetuneConfig`` for CPU training on the in-memory dataset.

    Raises:
        ValueError: if ``config_name`` is unknown.
    """
    from ..training.config import FinetuneConfig

    c = get_config(config_name)
    res_rate, head_rate = config_rates(spec, c)
    ft = spec.finetune
    if c.head == HEAD_AFTER:  # timm's own drop_rate on the plain model: dropout after pooling
        model, drop = dict(model=arch.base, drop_rate=head_rate), {}
    else:
        model = dict(model=arch.model, drop_rate=head_rate if c.head == HEAD_BEFORE else 0.0)
        drop = dict(res_drop_rate=res_rate if c.residual else 0.0, res_drop_pos=c.residual or AUTO)
    return FinetuneConfig(
        **model, **drop, model_kwargs=dict(arch.model_kwargs), pretrained_file=str(weights), dataset='in-memory',
        img_size=arch.img_size, crop_pct=1.0, interpolation='bilinear', hflip=ft.hflip, color_jitter=ft.color_jitter,
        scale=list(ft.scale), ratio=[1.0, 1.0], smoothing=ft.smoothing, opt=ft.opt, lr=ft.lr,
        weight_decay=ft.weight_decay, epochs=ft.epochs, warmup_epochs=ft.warmup_epochs, batch_size=ft.batch_size,
        seed=seed, cpu=True, num_workers=0, output_dir=str(output_dir), keep_checkpoints=1, progress=False)


def _fingerprint(spec: TransferSpec, arch: TransferArch, config_name: str) -> str:
    c = get_config(config_name)
    res_rate, head_rate = config_rates(spec, c)
    payload = dict(arch=asdict(arch), config=config_name, pretrain=asdict(spec.pretrain),
                   finetune=asdict(spec.finetune), source=spec.source_classes, target=spec.target_classes,
                   shots=spec.shots, val_per_class=spec.val_per_class, res_drop_rate=res_rate, head_drop_rate=head_rate)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _few_shot(spec: TransferSpec, data: TransferData, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of the few-shot training set and the disjoint validation set, drawn by ``seed``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    both = per_class_subset(data.target_train_y, spec.shots + spec.val_per_class, g)
    k = len(spec.target_classes)
    per = spec.shots + spec.val_per_class
    chunks = both.view(k, per)
    return chunks[:, :spec.shots].flatten(), chunks[:, spec.shots:].flatten()


def run_one(spec: TransferSpec, arch: TransferArch, config_name: str, seed: int, data: TransferData, weights: Path,
            work_dir: Path, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Fine-tune and test one (architecture, configuration, seed); return its record.

    The seed draws the few-shot training set and the disjoint validation set, then seeds the trainer.
    The last weights are evaluated with the trainer's eval transform on the target test set and on the
    few-shot training set. The run's trainer folder is deleted afterwards; only the record is kept.

    Args:
        spec: the study.
        arch: the architecture.
        config_name: the configuration (see ``ablation.get_config``).
        seed: the run's seed.
        data: the study's data.
        weights: the pretrained safetensors file of ``arch``.
        work_dir: scratch folder for the trainer's output (``<work_dir>/<arch>-<config>-seed<seed>``).
        log: called with a one-line summary when the run is done.

    Returns:
        The JSON-serialisable run record: ``arch``, ``config``, ``seed``, ``fingerprint``, ``model``,
        ``resolved_res_pos``, test ``top1`` (%) and ``nll``, ``train_nll``/``train_top1``,
        ``train_loss_last_epoch``, ``val_top1_last``, ``steps``, the rates used, image counts, ``wall_s``
        and the software/thread versions.

    Raises:
        ValueError: if ``config_name`` is unknown, or a target class has fewer than
            ``shots + val_per_class`` training images.
    """
    from ..training.data import DataBundle, TensorImageDataset, TransformedDataset, eval_loader, resolve_transforms
    from ..training.evaluate import evaluate
    from ..training.trainer import finetune

    t0 = time.time()
    tr_idx, va_idx = _few_shot(spec, data, seed)
    bundle = DataBundle(
        TensorImageDataset(data.target_train_x[tr_idx], data.target_train_y[tr_idx]),
        TensorImageDataset(data.target_train_x[va_idx], data.target_train_y[va_idx]),
        list(data.target_names), 1, f'Fashion-MNIST classes {list(spec.target_classes)}, {spec.shots} per class')
    out = work_dir / f'{arch.name}-{config_name}-seed{seed}'
    cfg = finetune_config(spec, arch, config_name, seed, weights, out)
    cfg = dataclasses.replace(cfg, overwrite=True)
    summary = finetune(cfg, data=bundle)
    from safetensors.torch import load_file

    model = timm.create_model(cfg.model, num_classes=len(data.target_names), in_chans=1, **arch.model_kwargs)
    model.load_state_dict(load_file(str(out / 'last' / 'model.safetensors')))
    _, eval_tf, _ = resolve_transforms(model, 1, img_size=cfg.img_size, crop_pct=cfg.crop_pct,
                                       interpolation=cfg.interpolation)
    test = eval_loader(TransformedDataset(TensorImageDataset(data.test_x, data.test_y), eval_tf), 500, num_workers=0)
    res = evaluate(model, test, label_names=data.target_names)
    train_eval = evaluate(model, eval_loader(TransformedDataset(bundle.train, eval_tf), 500, num_workers=0),
                          label_names=data.target_names)
    c = get_config(config_name)
    res_rate, head_rate = config_rates(spec, c)
    history = summary.get('history') or []
    rec = dict(
        arch=arch.name, config=config_name, seed=seed, fingerprint=_fingerprint(spec, arch, config_name),
        model=cfg.model, resolved_res_pos=resolved_position(model) if c.residual else None,
        top1=res.top1, nll=res.loss, train_nll=train_eval.loss, train_top1=train_eval.top1,
        train_loss_last_epoch=history[-1].get('train_loss') if history else None,
        val_top1_last=history[-1].get('top1') if history else None,
        steps=summary.get('global_steps'), res_drop_rate=res_rate if c.residual else 0.0,
        head_drop_rate=head_rate if c.head else 0.0, test_images=len(data.test_x), train_images=len(tr_idx),
        wall_s=round(time.time() - t0, 1), torch=torch.__version__, timm=timm.__version__,
        threads=torch.get_num_threads(), machine=platform.machine())
    shutil.rmtree(out, ignore_errors=True)
    log(f'{arch.name:>12} {config_name:>18} seed {seed}: top1 {res.top1:6.2f}  nll {res.loss:.4f}  '
        f'train nll {train_eval.loss:.4f}  ({rec["wall_s"]:.0f}s)')
    return rec


def _as_ablation_arch(arch: TransferArch) -> _AblationArch:
    return _AblationArch(arch.name, arch.model, dict(arch.model_kwargs))


def skipped_configs(spec: TransferSpec) -> Dict[str, Dict[str, str]]:
    """The configurations each architecture cannot run, with why (see ``ablation.configs_for``).

    Args:
        spec: the transfer specification.

    Returns:
        ``{architecture name: {configuration: reason}}``.
    """
    return {a.name: configs_for(_as_ablation_arch(a), spec.configs)[1] for a in spec.architectures}


def run_transfer(spec: TransferSpec, out_dir: str | os.PathLike, data: TransferData, *,
                 log: Callable[[str], None] = print, only_arch: Optional[Sequence[str]] = None,
                 ) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, str]]]:
    """Pretrain (once, cached in ``<out_dir>/pretrained``), then every missing fine-tuning run; seeds outermost.

    Finished runs are skipped, so rerunning resumes an interrupted study. A record written under a different
    specification (fingerprint mismatch) is an error, not silently reused. Pretrained weights are reused
    whenever ``<out_dir>/pretrained/<arch>.safetensors`` exists.

    Args:
        spec: the study.
        out_dir: output folder; records go to ``<out_dir>/runs/<arch>/<config>_seed<seed>.json``.
        data: the study's data.
        log: progress messages.
        only_arch: run only the architectures with these names (None: all).

    Returns:
        ``(records, skipped)``: all records of this specification, and per architecture
        ``{configuration: why it was left out}`` (see ``ablation.configs_for``).

    Raises:
        ValueError: if an existing record has another fingerprint or cannot be read.
        FloatingPointError: if pretraining diverges.
    """
    out = Path(out_dir)
    runs_dir = out / 'runs'
    plan: List[Tuple[TransferArch, str]] = []
    skipped: Dict[str, Dict[str, str]] = {}
    weights: Dict[str, Path] = {}
    for arch in spec.architectures:
        if only_arch and arch.name not in only_arch:
            continue
        names, skipped[arch.name] = configs_for(_as_ablation_arch(arch), spec.configs)
        plan += [(arch, n) for n in names]
        weights[arch.name] = out / 'pretrained' / f'{arch.name}.safetensors'
        if not weights[arch.name].is_file():
            pretrain(spec, arch, data, weights[arch.name], log=log)
    records = []
    with tempfile.TemporaryDirectory(prefix='dropres-transfer-') as work:
        for seed in spec.seeds:
            for arch, name in plan:
                path = runs_dir / arch.name / f'{name}_seed{seed}.json'
                expected = _fingerprint(spec, arch, name)
                if path.is_file():
                    rec = read_json(path, 'run record')
                    if rec.get('fingerprint') != expected:
                        raise ValueError(f'{path} was written by a different transfer specification (fingerprint '
                                         f'{rec.get("fingerprint")} != {expected}); delete it or use another folder')
                else:
                    rec = run_one(spec, arch, name, seed, data, weights[arch.name], Path(work), log=log)
                    write_json_atomic(path, rec, indent=1, sort_keys=True)
                records.append(rec)
    return records, skipped
