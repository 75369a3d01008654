"""The first studies' private training loop, kept as the reference that ``study_engine.py`` times the engine against.

Until issue 19 the package trained its from-scratch dropout studies with this loop
(``timm_dropres.research.ablation.run_one``, last in the package at commit 517010d). The studies now run through
the product's trainer (``dropres-study``); the package keeps one training loop, and this copy lives with the
benchmarks, which are not part of the package, so that the recorded engine-vs-harness measurement
(docs/results/bench/2026-12-04_study_engine.md) stays reproducible. It reads the harness's own YAML format
(``configs/study_overfit.yaml``, via :func:`timm_dropres.research.ablation.load_spec`) and builds the same models
(:func:`timm_dropres.research.ablation.build_model`). Checked when it moved: on 2-epoch runs of
``configs/study_overfit.yaml`` (resnet18, ``none`` and ``after_add``, seed 0, 500 test images) this copy and the
package's loop at 517010d gave bit-identical top-1, NLL, variance shift, steps and curve.

One run: Fashion-MNIST as normalised in-memory tensors, SGD/cosine through timm's ``create_optimizer_v2`` and
``create_scheduler_v2`` stepped per update, random 2-pixel translation + flip on tensors, the last weights tested
with the trainer's :func:`timm_dropres.training.evaluate.evaluate`, and the eval-mode variance shift of every BN.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from timm_dropres.research.ablation import AblationConfig, AblationSpec, ArchSpec, DataSpec, build_model, config_rates
from timm_dropres.research.analysis import shift_mean, variance_shift
from timm_dropres.training.evaluate import evaluate

__all__ = ['HarnessData', 'load_fmnist_data', 'select_classes', 'per_class_subset', 'augment', 'run_one']


@dataclass
class HarnessData:
    """Fashion-MNIST in memory, normalised once.

    Attributes:
        train_x: normalised float training images ``[N, 1, 28, 28]``.
        train_y: int64 training labels ``[N]``.
        test_x: normalised float test images ``[M, 1, 28, 28]``.
        test_y: int64 test labels ``[M]``.
        pad_value: the normalised value of a black pixel (the translation's padding).
        num_classes: number of classes (labels are ``0..num_classes-1``).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    pad_value: float = 0.0
    num_classes: int = 10


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples of ``classes`` only, relabelled ``0..len(classes)-1`` in the order given.

    Args:
        x: samples, indexed along the first dimension.
        y: integer labels ``[N]``.
        classes: the original labels to keep; their position becomes the new label.

    Returns:
        ``(x, y)`` restricted to those classes, in the original sample order, with the new labels.
    """
    table = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    table[torch.tensor(list(classes))] = torch.arange(len(classes))
    new = table[y]
    keep = new >= 0
    return x[keep], new[keep]


def per_class_subset(y: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class`` random samples of every class in ``y``, grouped by class in ascending label order.

    Args:
        y: integer labels ``[N]``.
        per_class: samples to draw from each class.
        generator: the RNG of the draw.

    Returns:
        int64 indices into ``y``.

    Raises:
        ValueError: if a class has fewer than ``per_class`` samples.
    """
    out = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f'class {c} has {len(idx)} samples, fewer than per_class={per_class}')
        out.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(out)


def load_fmnist_data(spec: DataSpec, root: Optional[str | os.PathLike] = None) -> HarnessData:
    """Fashion-MNIST as normalised tensors, subset as ``spec`` says (``classes``, ``train_per_class``, subsets).

    Normalisation uses the mean and std of the full training split; every subset is drawn from one generator
    seeded with ``spec.data_seed``.

    Args:
        spec: which classes and how many images.
        root: folder holding the four idx files; None searches ``$FASHION_MNIST_DIR`` and Debian's path.

    Returns:
        The data.

    Raises:
        FileNotFoundError: if the Fashion-MNIST idx files are not found.
        ValueError: if a subset size is out of range or a class has fewer than ``train_per_class`` images.
    """
    from timm_dropres.training.fmnist import load_fashion_mnist

    tr_x, tr_y = load_fashion_mnist('train', root)
    te_x, te_y = load_fashion_mnist('test', root)
    mean, std = tr_x.float().mean().item() / 255.0, tr_x.float().std().item() / 255.0
    g = torch.Generator().manual_seed(spec.data_seed)

    def subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if n is None:
            return x, y
        if not 0 < n <= len(x):
            raise ValueError(f'{split}_subset must be in [1, {len(x)}] or null, got {n}')
        idx = torch.randperm(len(x), generator=g)[:n]
        return x[idx], y[idx]

    num_classes = 10
    if spec.classes is not None:
        tr_x, tr_y = select_classes(tr_x, tr_y, spec.classes)
        te_x, te_y = select_classes(te_x, te_y, spec.classes)
        num_classes = len(spec.classes)
    if spec.train_per_class is not None:
        idx = per_class_subset(tr_y, spec.train_per_class, g)
        tr_x, tr_y = tr_x[idx], tr_y[idx]
    tr_x, tr_y = subset(tr_x, tr_y, spec.train_subset, 'train')
    te_x, te_y = subset(te_x, te_y, spec.test_subset, 'test')

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - mean) / std).unsqueeze(1).contiguous()

    return HarnessData(norm(tr_x), tr_y, norm(te_x), te_y, pad_value=-mean / std, num_classes=num_classes)


def augment(x: torch.Tensor, pad_value: float, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (padding with ``pad_value``) and horizontal flip, per sample.

    Args:
        x: a batch ``[N, 1, H, W]``.
        pad_value: the padding value.
        gen: the RNG of the shifts and flips.
        pad: the largest shift.

    Returns:
        The augmented batch, same shape.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=pad_value)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None] + dy[:, None])[:, :, None]
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> Tuple[float, float]:
    res = evaluate(model, list(zip(x.split(batch_size), y.split(batch_size), strict=True)))
    return res.top1, res.loss


def run_one(spec: AblationSpec, arch: ArchSpec, config: AblationConfig, seed: int, data: HarnessData) -> Dict[str, Any]:
    """Train, test and measure one (architecture, configuration, seed) with the first studies' loop.

    ``seed`` fixes the initial weights, the data order and augmentation (a dedicated generator) and, re-seeded
    after the model is built, the dropout masks. The last partial batch of an epoch is dropped.

    Args:
        spec: the harness's study (schedule, rates, data settings).
        arch: the architecture.
        config: the placement.
        seed: the run's seed.
        data: the in-memory data.

    Returns:
        ``top1`` (%) and ``nll`` on the test images, ``vs_mean`` (variance shift), ``steps``, the per-epoch
        ``curve`` (when ``schedule.curve_every``) and ``wall_s``.

    Raises:
        ValueError: if ``schedule.batch_size`` is larger than the training set.
        FloatingPointError: if the training loss becomes NaN or infinite.
    """
    t0 = time.time()
    sch = spec.schedule
    torch.manual_seed(seed)
    res_rate, head_rate = config_rates(spec, config)
    model = build_model(arch, config, res_drop_rate=res_rate, head_drop_rate=head_rate,
                        num_classes=data.num_classes, in_chans=data.train_x.shape[1])
    torch.manual_seed(seed + 10_000)
    data_gen = torch.Generator().manual_seed(seed)
    n = len(data.train_x)
    steps_per_epoch = n // sch.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f'batch_size {sch.batch_size} is larger than the training set ({n} images)')
    optimizer = create_optimizer_v2(model, opt=sch.opt, lr=sch.lr, weight_decay=sch.weight_decay,
                                    momentum=sch.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sch.sched, num_epochs=sch.epochs, warmup_epochs=sch.warmup_epochs, warmup_lr=sch.warmup_lr,
        min_lr=sch.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    model.train()
    step = 0
    curve: List[Dict[str, float]] = []
    curve_x, curve_y = data.test_x[:sch.curve_images], data.test_y[:sch.curve_images]
    for epoch in range(sch.epochs):
        order = torch.randperm(n, generator=data_gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * sch.batch_size:(i + 1) * sch.batch_size]
            xb, yb = data.train_x[idx], data.train_y[idx]
            if sch.augment:
                xb = augment(xb, data.pad_value, data_gen)
            loss = F.cross_entropy(model(xb), yb)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'{arch.name}/{config.name}/seed {seed}: loss {loss.item()} at step {step}')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            loss_sum += loss.item()
        if sch.curve_every and ((epoch + 1) % sch.curve_every == 0 or epoch + 1 == sch.epochs):
            c_top1, c_nll = _evaluate(model, curve_x, curve_y)
            model.train()
            curve.append(dict(epoch=epoch + 1, train_loss=loss_sum / steps_per_epoch, test_nll=c_nll,
                              test_top1=c_top1))
    top1, nll = _evaluate(model, data.test_x, data.test_y)
    _evaluate(model, data.train_x[:2000], data.train_y[:2000])  # the first studies' train NLL: same work
    shifts = variance_shift(model, list(data.train_x[:spec.data.vs_images].split(500)))
    return dict(top1=top1, nll=nll, vs_mean=shift_mean(shifts), steps=step, curve=curve,
                wall_s=round(time.time() - t0, 1))
