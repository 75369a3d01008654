"""Dropout-placement ablation on real data: train one architecture per placement, N seeds each, and compare.

Configurations (``CONFIGS``): no dropout, the dropres default, each residual position the public API offers,
two hazards that exist only here (dropout before every BN of the branch; dropout on the block output, after
the residual addition), and head dropout after vs before global pooling. The hazards are placed with hooks
(``place_before_every_bn``, ``place_after_add``, ``place_head_after_pool``) so they never enter the public
``res_drop_pos`` vocabulary.

One run = build (``timm.create_model``) -> train (timm's ``create_optimizer_v2``/``create_scheduler_v2``)
-> top-1 and NLL on the test set -> eval-mode variance shift of every BN (``analysis.variance_shift``). Each
finished run writes a small JSON; ``run_ablation`` skips runs whose JSON exists, so an interrupted
ablation resumes where it stopped. ``summarize`` and ``write_report`` turn the records into mean ± std
tables, a CSV and a PNG, with differences inside the seed spread marked not significant (``compare``).

Data are in-memory tensors, not the trainer's PIL DataLoader: at 28x28 on 2 CPU cores the per-image PIL
pipeline would cost more than the network, and the ablation needs dozens of runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..files import read_json, write_json_atomic
from ..models.blocks import block_norms
from ..models.convert import residual_blocks
from ..models.layers import AFTER_LAST_BN, AUTO, BEFORE_LAST_CONV, check_rate
from ..training.evaluate import evaluate
from .analysis import shift_max, shift_mean, variance_shift

__all__ = [
    'AblationConfig', 'CONFIGS', 'get_config', 'AblationDropout', 'place_before_every_bn', 'place_after_add',
    'place_head_after_pool', 'small_input_stem', 'ArchSpec', 'Schedule', 'DataSpec', 'AblationSpec',
    'load_spec', 'AblationData', 'load_fmnist_data', 'build_model', 'configs_for', 'run_one', 'run_ablation',
    'read_records', 'select_classes', 'per_class_subset', 'CONFIG_ORDER', 'config_rates', 'resolved_position',
    'dataclass_from_mapping', 'read_spec_mapping',
]

# ----------------------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------------------

BEFORE_EVERY_BN = 'before_every_bn'
AFTER_ADD = 'after_add'
HEAD_BEFORE = 'before_pool'
HEAD_AFTER = 'after_pool'


@dataclass(frozen=True)
class AblationConfig:
    """One dropout placement of the ablation: where residual dropout goes and where head dropout goes.

    Attributes:
        name: the configuration's name (a key of ``CONFIGS``, or ``'<name>@<p>'`` for a rate override).
        residual: residual dropout position: a public ``res_drop_pos`` (``'auto'``, ``'after_last_bn'``,
            ``'before_last_conv'``), one of the hook-placed hazards (``'before_every_bn'``,
            ``'after_add'``), or None for no residual dropout.
        head: head dropout position, ``'before_pool'`` or ``'after_pool'``, or None for no head dropout.
        label: a human-readable description for the report.
        rate: if set, overrides the spec's residual and head rates (set by ``get_config('<name>@<p>')``).
    """

    name: str
    residual: Optional[str]
    head: Optional[str]
    label: str
    #: overrides the spec's residual and head rates (set by ``get_config('<name>@<p>')``)
    rate: Optional[float] = None


#: Every configuration, in report order. ``residual`` is a public ``res_drop_pos`` or one of the two
#: ablation-only hazards; the head configs switch residual dropout off to isolate the head.
CONFIGS: Dict[str, AblationConfig] = {c.name: c for c in (
    AblationConfig('none', None, None, 'no dropout'),
    AblationConfig('default', AUTO, HEAD_BEFORE, "guideline: residual at 'auto' + head before pool"),
    AblationConfig('residual', AUTO, None, "residual only, at the guideline position ('auto')"),
    AblationConfig('after_last_bn', AFTER_LAST_BN, None, 'residual after the last BN (before the addition)'),
    AblationConfig('before_last_conv', BEFORE_LAST_CONV, None, 'residual before the last conv'),
    AblationConfig(BEFORE_EVERY_BN, BEFORE_EVERY_BN, None, 'hazard: dropout before every BN of the branch'),
    AblationConfig(AFTER_ADD, AFTER_ADD, None, 'hazard: dropout on the block output (after the addition)'),
    AblationConfig('head_after_pool', None, HEAD_AFTER, "head dropout after pooling (timm's drop_rate)"),
    AblationConfig('head_before_pool', None, HEAD_BEFORE, 'head dropout before pooling (paper)'),
)}


#: report order of the configurations
CONFIG_ORDER: Tuple[str, ...] = tuple(CONFIGS)


def get_config(name: str) -> AblationConfig:
    """Look up a configuration by name, with an optional ``@<p>`` rate override for rate sweeps.

    ``'<name>@<p>'`` is that configuration with both its rates set to ``p``, so one ablation can sweep the
    rate (e.g. ``default@0.1``, ``default@0.3``) next to the placements.

    Args:
        name: a key of ``CONFIGS``, optionally suffixed ``@<p>`` with ``p`` in [0, 1).

    Returns:
        The configuration; with a suffix, a copy named ``name`` with ``rate=p`` and ``, p = <p>`` appended
        to its label.

    Raises:
        ValueError: if the base name is unknown, or the rate after ``@`` is not a number in [0, 1).

    Example:
        >>> get_config('none').residual is None
        True
        >>> c = get_config('default@0.1')
        >>> c.name, c.residual, c.head, c.rate
        ('default@0.1', 'auto', 'before_pool', 0.1)
    """
    base, sep, rate = name.partition('@')
    if base not in CONFIGS:
        raise ValueError(f'unknown configuration {name!r}; valid: {list(CONFIGS)}, optionally suffixed @<rate>')
    if not sep:
        return CONFIGS[base]
    try:
        p = float(rate)
    except ValueError:
        raise ValueError(f'configuration {name!r}: the rate after @ must be a number, got {rate!r}') from None
    p = check_rate(f'rate of {name!r}', p)
    return dataclasses.replace(CONFIGS[base], name=name, rate=p, label=f'{CONFIGS[base].label}, p = {p:g}')


# ----------------------------------------------------------------------------------------------------------
# ablation-only dropout placements (hooks; never part of the public API)
# ----------------------------------------------------------------------------------------------------------

class AblationDropout(nn.Dropout):
    """Inverted dropout applied by an ablation hook, at positions the public API deliberately does not offer.

    It is registered as a child (``ablation_drop``) of the hooked module, so ``train()``/``eval()`` reach it
    and it is active in training only, like any ``nn.Dropout``.

    Args:
        p: drop probability, in [0, 1).
        where: the placement, shown by ``print(model)`` (e.g. ``'before_bn'``, ``'after_add'``).

    Raises:
        ValueError: if ``p`` is not in [0, 1).
    """

    def __init__(self, p: float, where: str) -> None:
        super().__init__(p=check_rate('p', p))
        self.where = where

    def extra_repr(self) -> str:
        return f'p={self.p}, where={self.where} (ablation hook)'


def _drop_first_arg(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return (module.ablation_drop(args[0]), *args[1:])


def _drop_output(module: nn.Module, _args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return module.ablation_drop(output)


def place_before_every_bn(model: nn.Module, p: float) -> List[nn.Module]:
    """Add the "dropout before every BN" hazard: drop the input of every BN inside every residual branch.

    Forward pre-hooks replace only the BN's input: a pre-activation block's shortcut still sees the
    undropped tensor. The hooks stay for the model's lifetime (their handles are not kept).

    Args:
        model: a supported ResNet-family model (see ``residual_blocks``); modified in place.
        p: drop probability, in [0, 1).

    Returns:
        The hooked BN modules, in forward order.

    Raises:
        TypeError: if the model type is not supported.
        ValueError: if ``p`` is not in [0, 1).
    """
    hooked = []
    for _, block in residual_blocks(model):
        for norm in block_norms(block).values():
            norm.ablation_drop = AblationDropout(p, 'before_bn')
            norm.register_forward_pre_hook(_drop_first_arg)
            hooked.append(norm)
    return hooked


def place_after_add(model: nn.Module, p: float) -> List[nn.Module]:
    """Add the "dropout after the addition" hazard: drop every residual block's output with a forward hook.

    The dropout acts after the residual addition (and, in post-activation blocks, after the final ReLU),
    so it reaches the shortcut path and the next block's first BN.

    Args:
        model: a supported ResNet-family model (see ``residual_blocks``); modified in place.
        p: drop probability, in [0, 1).

    Returns:
        The hooked blocks, in forward order.

    Raises:
        TypeError: if the model type is not supported.
        ValueError: if ``p`` is not in [0, 1).
    """
    hooked = []
    for _, block in residual_blocks(model):
        block.ablation_drop = AblationDropout(p, 'after_add')
        block.register_forward_hook(_drop_output)
        hooked.append(block)
    return hooked


def _global_pool(model: nn.Module) -> nn.Module:
    if isinstance(model, ResNet):
        return model.global_pool
    if isinstance(model, ResNetV2):
        return model.head.global_pool
    raise TypeError(f'no global pool known for {type(model).__name__}; supported: ResNet, ResNetV2')


def place_head_after_pool(model: nn.Module, p: float) -> nn.Module:
    """Add head dropout after global pooling (what timm's ``drop_rate`` does), via a hook on the global pool.

    Args:
        model: a timm ``ResNet`` or ``ResNetV2`` (dropres or not); modified in place.
        p: drop probability, in [0, 1).

    Returns:
        The hooked global-pool module.

    Raises:
        TypeError: if the model is not a timm ``ResNet``/``ResNetV2``.
        ValueError: if ``p`` is not in [0, 1).
    """
    pool = _global_pool(model)
    pool.ablation_drop = AblationDropout(p, 'head_after_pool')
    pool.register_forward_hook(_drop_output)
    return pool


def small_input_stem(model: nn.Module, stride: int) -> nn.Module:
    """Adapt an ImageNet stem to 28x28 inputs: first conv at ``stride``, no max-pool (weights unchanged).

    timm's ResNet/ResNetV2 have no option for this (their stems always reduce by 4), and at 28x28 that
    would leave a 1x1 final map on which head dropout before and after pooling are the same thing.

    Args:
        model: a timm ``ResNet`` or ``ResNetV2``; modified in place.
        stride: stride of the stem's first conv, 1 or 2.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if ``stride`` is not 1 or 2.
        TypeError: if the model is not a timm ``ResNet``/``ResNetV2``.
    """
    if stride not in (1, 2):
        raise ValueError(f'stem_stride must be 1 or 2, got {stride!r}')
    if isinstance(model, ResNet):
        first = model.conv1[0] if isinstance(model.conv1, nn.Sequential) else model.conv1
        model.maxpool = nn.Identity()
    elif isinstance(model, ResNetV2):
        first = model.stem.conv if hasattr(model.stem, 'conv') else model.stem.conv1
        model.stem.pool = nn.Identity()
    else:
        raise TypeError(f'small_input_stem supports timm ResNet and ResNetV2, got {type(model).__name__}')
    first.stride = (stride, stride)
    return model


# ----------------------------------------------------------------------------------------------------------
# specification (the YAML file)
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchSpec:
    """One architecture of an ablation (an entry of the YAML's ``architectures`` list).

    Attributes:
        name: short unique name, used in run paths and reports.
        model: the timm ``*_dropres`` model name passed to ``timm.create_model``.
        model_kwargs: extra ``timm.create_model`` keyword arguments.
        stem_stride: if set, ``small_input_stem`` adapts the stem to 28x28 inputs with this stride (1 or 2).
        label: description shown in the report.
    """

    name: str
    model: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    stem_stride: Optional[int] = None
    label: str = ''


@dataclass(frozen=True)
class Schedule:
    """Training schedule (the YAML's ``schedule``), identical for every configuration and seed.

    Attributes:
        epochs: training epochs.
        batch_size: training batch size; the last partial batch of an epoch is dropped.
        opt: optimizer name for timm's ``create_optimizer_v2``.
        lr: peak learning rate.
        weight_decay: weight decay.
        momentum: optimizer momentum.
        sched: scheduler name for timm's ``create_scheduler_v2`` (stepped per update).
        warmup_epochs: warmup length in epochs.
        warmup_lr: learning rate at the start of warmup.
        min_lr: final learning rate.
        augment: random translation by up to 2 pixels and horizontal flip of every training batch.
        curve_every: every this many epochs (and at the last), record the train loss and test NLL/top-1 on
            ``curve_images`` test images (0: off); the over-fitting study uses it to show the test NLL of
            the no-dropout model rising.
        curve_images: number of test images for the curve.
    """

    epochs: int = 2
    batch_size: int = 128
    opt: str = 'sgd'
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    sched: str = 'cosine'
    warmup_epochs: int = 0
    warmup_lr: float = 1e-3
    min_lr: float = 0.0
    augment: bool = True
    #: every this many epochs, record test NLL/top-1 on ``curve_images`` test images and the train loss (0: off);
    #: the over-fitting study uses it to show the test NLL of the no-dropout model rising
    curve_every: int = 0
    curve_images: int = 2000


@dataclass(frozen=True)
class DataSpec:
    """The Fashion-MNIST subset an ablation trains and tests on (the YAML's ``data``).

    The subsets are drawn once with ``data_seed`` and shared by every run, so every configuration and
    seed sees the same images.

    Attributes:
        train_subset: number of randomly drawn training images (None: all of them).
        test_subset: number of randomly drawn test images (None: all of them).
        data_seed: seed of the subset draws.
        vs_images: unaugmented training images that feed the variance-shift measurement.
        train_per_class: a class-balanced training subset of this many images per class, instead of
            ``train_subset``.
        classes: train and test on these classes only (labels renumbered 0..k-1 in this order); None: all ten.

    Raises:
        ValueError: if both ``train_subset`` and ``train_per_class`` are given, or ``classes`` is not at
            least two distinct integers in 0..9.
    """

    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    data_seed: int = 0
    vs_images: int = 2000
    #: a class-balanced training subset: this many images of every class (instead of ``train_subset``)
    train_per_class: Optional[int] = None
    #: train and test on these classes only (labels renumbered 0..k-1 in this order); None = all ten
    classes: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.train_subset is not None and self.train_per_class is not None:
            raise ValueError(f'give train_subset ({self.train_subset}) or train_per_class ({self.train_per_class}), '
                             'not both')
        if self.classes is not None:
            object.__setattr__(self, 'classes', tuple(self.classes))
            bad = [c for c in self.classes if not (isinstance(c, int) and 0 <= c < 10)]
            if bad or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
                raise ValueError(f'classes must be at least two distinct integers in 0..9, got {list(self.classes)}')


@dataclass(frozen=True)
class AblationSpec:
    """Everything that defines an ablation (one YAML file); each run's fingerprint is derived from it.

    Attributes:
        architectures: the networks to train; names must be unique.
        configs: configuration names (see ``get_config``), in report order.
        seeds: seeds; each seed fixes initial weights, data order and augmentation for every configuration.
        res_drop_rate: residual dropout rate (unless a configuration sets ``@<p>``).
        head_drop_rate: head dropout rate (unless a configuration sets ``@<p>``).
        schedule: the training schedule.
        data: the data subset.
        alpha: family-wise error rate of the Holm-corrected paired t-tests in the report.

    Raises:
        ValueError: if ``architectures`` or ``seeds`` is empty, a configuration is unknown, a rate is not
            in [0, 1), or architecture names repeat.
    """

    architectures: Tuple[ArchSpec, ...]
    configs: Tuple[str, ...] = tuple(CONFIGS)
    seeds: Tuple[int, ...] = (0, 1, 2)
    res_drop_rate: float = 0.2
    head_drop_rate: float = 0.2
    schedule: Schedule = Schedule()
    data: DataSpec = DataSpec()
    #: family-wise error rate of the Holm-corrected paired t-tests in the report
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if not self.architectures:
            raise ValueError('architectures is empty: name at least one')
        unknown = [c for c in self.configs if c.partition('@')[0] not in CONFIGS]
        if unknown:
            raise ValueError(f'unknown configurations {unknown}; valid: {list(CONFIGS)}, optionally suffixed @<rate>')
        for c in self.configs:
            get_config(c)
        if not self.seeds:
            raise ValueError('seeds is empty: name at least one')
        check_rate('res_drop_rate', self.res_drop_rate)
        check_rate('head_drop_rate', self.head_drop_rate)
        names = [a.name for a in self.architectures]
        if len(set(names)) != len(names):
            raise ValueError(f'architecture names must be unique, got {names}')


def dataclass_from_mapping(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)``, refusing unknown keys with an error that names ``where`` and the valid keys."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f'{where}: unknown keys {unknown}; valid: {valid}')
    return cls(**values)


def read_spec_mapping(path: str | os.PathLike) -> Dict[str, Any]:
    """The top-level mapping of a study's YAML specification (an empty file is an empty mapping).

    Raises:
        ValueError: if the top level is not a mapping, or a key is given twice in one mapping.
    """
    import yaml

    from ..strict_yaml import safe_load_strict
    try:
        raw = safe_load_strict(Path(path).read_text()) or {}
    except yaml.constructor.ConstructorError as e:  # a key given twice: the last would silently win
        raise ValueError(f'{path}: {e.problem} (line {e.problem_mark.line + 1})') from None
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: expected a mapping at the top level, got {type(raw).__name__}')
    return dict(raw)


def load_spec(path: str | os.PathLike) -> AblationSpec:
    """Read an ablation specification from YAML; unknown keys are errors, so a typo cannot pass silently.

    Args:
        path: the YAML file (see ``configs/ablation_fmnist.yaml``): top-level ``AblationSpec`` fields, with
            ``architectures`` a list of ``ArchSpec`` mappings and ``schedule``/``data`` mappings.

    Returns:
        The validated specification.

    Raises:
        OSError: if the file cannot be opened.
        yaml.YAMLError: if the file is not valid YAML.
        ValueError: if the top level is not a mapping, a key is unknown, the retired ``significance_k``
            key is present, or a value is invalid (see ``AblationSpec``, ``DataSpec``).

    Example:
        >>> spec = load_spec('configs/ablation_fmnist.yaml')  # doctest: +SKIP
        >>> [a.name for a in spec.architectures]  # doctest: +SKIP
    """
    raw = read_spec_mapping(path)
    archs = tuple(dataclass_from_mapping(ArchSpec, a, f'{path}: architectures[{i}]')
                  for i, a in enumerate(raw.pop('architectures', []) or []))
    schedule = dataclass_from_mapping(Schedule, raw.pop('schedule', {}) or {}, f'{path}: schedule')
    data = dataclass_from_mapping(DataSpec, raw.pop('data', {}) or {}, f'{path}: data')
    for key in ('configs', 'seeds'):
        if key in raw:
            raw[key] = tuple(raw[key])
    if 'significance_k' in raw:
        raise ValueError(f'{path}: significance_k is gone; comparisons are paired t-tests with Holm correction '
                         '(set alpha instead)')
    return dataclass_from_mapping(AblationSpec, dict(raw, architectures=archs, schedule=schedule, data=data), str(path))


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------

@dataclass
class AblationData:
    """The ablation's data, in memory and normalized once.

    Attributes:
        train_x: normalized float training images ``[N, 1, 28, 28]``.
        train_y: int64 training labels ``[N]``.
        test_x: normalized float test images ``[M, 1, 28, 28]``.
        test_y: int64 test labels ``[M]``.
        pad_value: the normalized value of a black pixel, used to pad for the random-crop augmentation.
        num_classes: number of classes (labels are ``0..num_classes-1``).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    pad_value: float = 0.0
    num_classes: int = 10


def load_fmnist_data(spec: DataSpec, root: Optional[str | os.PathLike] = None) -> AblationData:
    """Load Fashion-MNIST as in-memory tensors for the ablation, subset as ``spec`` says.

    Normalization uses the mean and std of the full training split (all classes), so a subset does not
    change the input scale. Subsets are applied in this order: ``classes``, then ``train_per_class``,
    then ``train_subset``/``test_subset``, all drawn from one generator seeded with ``spec.data_seed``.

    Args:
        spec: which classes and how many images.
        root: folder holding the four idx files; None searches ``$FASHION_MNIST_DIR`` and Debian's path.

    Returns:
        The normalized tensors and labels.

    Raises:
        FileNotFoundError: if the Fashion-MNIST idx files are not found (``FashionMNISTNotFound``).
        ValueError: if a subset size is out of range, a class has fewer than ``train_per_class`` images, or
            an idx file is malformed.

    Example:
        >>> data = load_fmnist_data(DataSpec(train_per_class=100, classes=(0, 1)))  # doctest: +SKIP
        >>> data.train_x.shape, data.num_classes  # doctest: +SKIP
        (torch.Size([200, 1, 28, 28]), 2)
    """
    from ..training.fmnist import load_fashion_mnist

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

    return AblationData(norm(tr_x), tr_y, norm(te_x), te_y, pad_value=-mean / std, num_classes=num_classes)


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples of ``classes`` only, relabelled ``0..len(classes)-1`` in the order given.

    Args:
        x: samples, indexed along the first dimension.
        y: integer labels ``[N]``.
        classes: the original labels to keep; their position becomes the new label.

    Returns:
        ``(x, y)`` restricted to those classes, in the original sample order, with the new labels.

    Example:
        >>> import torch
        >>> x, y = select_classes(torch.arange(5), torch.tensor([3, 1, 3, 0, 1]), [3, 1])
        >>> x.tolist(), y.tolist()
        ([0, 1, 2, 4], [0, 1, 0, 1])
    """
    table = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    table[torch.tensor(list(classes))] = torch.arange(len(classes))
    new = table[y]
    keep = new >= 0
    return x[keep], new[keep]


def per_class_subset(y: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Draw a class-balanced subset: ``per_class`` random samples of every class present in ``y``.

    Args:
        y: integer labels ``[N]``.
        per_class: samples to draw from each class.
        generator: the RNG of the draw (the same generator state gives the same subset).

    Returns:
        int64 indices into ``y``, grouped by class in ascending label order (``per_class`` per class).

    Raises:
        ValueError: if a class has fewer than ``per_class`` samples.

    Example:
        >>> import torch
        >>> idx = per_class_subset(torch.tensor([0, 1, 0, 1, 0]), 2, torch.Generator().manual_seed(0))
        >>> torch.tensor([0, 1, 0, 1, 0])[idx].tolist()
        [0, 0, 1, 1]
    """
    out = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f'class {c} has {len(idx)} samples, fewer than per_class={per_class}')
        out.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(out)


def _augment(x: torch.Tensor, pad_value: float, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (``pad`` pixels of translation) and horizontal flip, per sample, on a batch tensor."""
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


# ----------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------

def resolved_position(model: nn.Module) -> Optional[str]:
    """The residual dropout position the model's blocks resolved to (``res_drop_pos``), None without blocks."""
    blocks = list(residual_blocks(model))
    return blocks[0][1].res_drop_pos if blocks else None


def build_model(
        arch: ArchSpec, config: AblationConfig, *, res_drop_rate: float, head_drop_rate: float, num_classes: int = 10,
        in_chans: int = 1,
) -> nn.Module:
    """Build the network of one configuration; every configuration gets identical parameters at a given RNG state.

    Public positions go through ``timm.create_model`` (``res_drop_rate``/``res_drop_pos``, and ``drop_rate``
    for head dropout before pooling); the hazards and head dropout after pooling are added with hooks,
    which add no parameters. ``arch.stem_stride`` adapts the stem with ``small_input_stem``.

    Args:
        arch: the architecture.
        config: the placement.
        res_drop_rate: residual dropout rate (used only if the configuration has residual dropout).
        head_drop_rate: head dropout rate (used only if the configuration has head dropout).
        num_classes: classifier outputs.
        in_chans: input channels.

    Returns:
        The model, with any hooks and the stem adaptation applied.

    Raises:
        ValueError: if a rate is not in [0, 1).
        TypeError: if the architecture is not a supported timm ``ResNet``/``ResNetV2`` for the hooks or
            the stem adaptation.

    Example:
        >>> import torch
        >>> arch = ArchSpec('r18', 'resnet18_dropres', stem_stride=1)
        >>> model = build_model(arch, get_config('default'), res_drop_rate=0.1, head_drop_rate=0.1)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    public_pos = config.residual in (AUTO, AFTER_LAST_BN, BEFORE_LAST_CONV)
    model = timm.create_model(
        arch.model, num_classes=num_classes, in_chans=in_chans,
        drop_rate=head_drop_rate if config.head == HEAD_BEFORE else 0.0,
        res_drop_rate=res_drop_rate if public_pos else 0.0,
        res_drop_pos=config.residual if public_pos else AUTO,
        **arch.model_kwargs)
    if arch.stem_stride is not None:
        small_input_stem(model, arch.stem_stride)
    if config.residual == BEFORE_EVERY_BN:
        place_before_every_bn(model, res_drop_rate)
    elif config.residual == AFTER_ADD:
        place_after_add(model, res_drop_rate)
    if config.head == HEAD_AFTER:
        place_head_after_pool(model, head_drop_rate)
    return model


def configs_for(arch: ArchSpec, names: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Keep the configurations that are distinct networks for ``arch``, and say why any others were left out.

    A pre-activation branch has one candidate position, so 'after_last_bn', 'before_last_conv' and 'residual'
    (the 'auto' position) are the same network there, and training it twice would only waste compute. Of such
    duplicates, 'residual' is kept, else the one named after the position it resolves to, else the first.
    Three probe models of ``arch`` are built to find the resolved positions.

    Args:
        arch: the architecture.
        names: configuration names (see ``get_config``).

    Returns:
        ``(kept, skipped)``: the kept names in the given order, and ``{left-out name: reason}``.

    Raises:
        ValueError: if a configuration name is unknown.
    """
    probe_pos = {}
    for pos in (AUTO, AFTER_LAST_BN, BEFORE_LAST_CONV):
        probe = build_model(arch, AblationConfig('probe', pos, None, ''), res_drop_rate=0.1, head_drop_rate=0.0)
        probe_pos[pos] = resolved_position(probe)
    groups: Dict[Tuple[Any, ...], List[str]] = {}
    for name in names:
        c = get_config(name)
        if c.residual in probe_pos:
            groups.setdefault((probe_pos[c.residual], c.head, c.rate), []).append(name)

    def priority(name: str) -> int:
        base = name.partition('@')[0]
        return 0 if base == 'residual' else 1 if base == probe_pos[get_config(name).residual] else 2

    skipped: Dict[str, str] = {}
    for (pos, _, _), members in groups.items():
        keep = min(members, key=lambda n: (priority(n), members.index(n)))
        for name in members:
            if name != keep:
                skipped[name] = f"same network as '{keep}' here: both resolve to '{pos}'"
    return [n for n in names if n not in skipped], skipped


def config_rates(spec: Any, config: AblationConfig) -> Tuple[float, float]:
    """``(residual rate, head rate)`` of ``config`` in a study ``spec`` (ablation or transfer): the rate suffix
    (``'<name>@<p>'``) when there is one, else the spec's ``res_drop_rate`` and ``head_drop_rate``."""
    if config.rate is not None:
        return config.rate, config.rate
    return spec.res_drop_rate, spec.head_drop_rate


#: keys added after the first ablation ran; left out of the fingerprint while unset, so its runs still match
_NEW_DATA_KEYS = ('train_per_class', 'classes')
_NEW_SCHEDULE_KEYS = ('curve_every', 'curve_images')


def _fingerprint(spec: AblationSpec, arch: ArchSpec, config: AblationConfig) -> str:
    cfg = {k: v for k, v in asdict(config).items() if k != 'rate' or v is not None}
    res_rate, head_rate = config_rates(spec, config)
    schedule = {k: v for k, v in asdict(spec.schedule).items()
                if k not in _NEW_SCHEDULE_KEYS or spec.schedule.curve_every}
    data = {k: v for k, v in asdict(spec.data).items() if k not in _NEW_DATA_KEYS or v is not None}
    payload = dict(arch=asdict(arch), config=cfg, schedule=schedule, data=data,
                   res_drop_rate=res_rate, head_drop_rate=head_rate)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> Tuple[float, float]:
    """Top-1 % and mean NLL with the trainer's own evaluation (in-memory batches instead of a loader)."""
    res = evaluate(model, list(zip(x.split(batch_size), y.split(batch_size), strict=True)))
    return res.top1, res.loss


def run_one(
        spec: AblationSpec, arch: ArchSpec, config: AblationConfig, seed: int, data: AblationData,
        log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train, evaluate and measure one (architecture, configuration, seed); return its record.

    ``seed`` fixes the initial weights (the same for every configuration, since dropout adds no parameters),
    the data order and augmentation (a dedicated generator, so dropout masks cannot perturb it), and the
    dropout masks (the global RNG, re-seeded after the model is built). After training, the last weights
    are evaluated on the test set and on the first 2000 training images, and the eval-mode variance shift
    of every BN is measured on the first ``spec.data.vs_images`` unaugmented training images.

    Args:
        spec: the ablation (schedule, rates, data settings).
        arch: the architecture.
        config: the placement.
        seed: the run's seed.
        data: the in-memory data.
        log: called with a one-line summary when the run is done.

    Returns:
        The JSON-serialisable run record: ``arch``, ``config``, ``seed``, ``fingerprint``,
        ``resolved_res_pos``, test ``top1`` (%) and ``nll``, ``vs_mean``/``vs_max``/``vs_layers`` (variance
        shift), ``train_nll``/``train_top1``/``train_loss_last_epoch``, ``steps``, the rates used, ``curve``
        (if ``schedule.curve_every``), wall times and the software/thread versions.

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
    steps_per_epoch = n // sch.batch_size  # drop the last partial batch: BN on a tiny batch is noise
    if steps_per_epoch < 1:
        raise ValueError(f'batch_size {sch.batch_size} is larger than the training set ({n} images)')
    optimizer = create_optimizer_v2(model, opt=sch.opt, lr=sch.lr, weight_decay=sch.weight_decay,
                                    momentum=sch.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sch.sched, num_epochs=sch.epochs, warmup_epochs=sch.warmup_epochs, warmup_lr=sch.warmup_lr,
        min_lr=sch.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    model.train()
    step, loss_sum, loss_n = 0, 0.0, 0
    curve: List[Dict[str, float]] = []
    curve_x, curve_y = data.test_x[:sch.curve_images], data.test_y[:sch.curve_images]
    for epoch in range(sch.epochs):
        order = torch.randperm(n, generator=data_gen)
        loss_sum, loss_n = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * sch.batch_size:(i + 1) * sch.batch_size]
            xb, yb = data.train_x[idx], data.train_y[idx]
            if sch.augment:
                xb = _augment(xb, data.pad_value, data_gen)
            loss = F.cross_entropy(model(xb), yb)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'{arch.name}/{config.name}/seed {seed}: loss {loss.item()} at step {step}')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            loss_sum += loss.item()
            loss_n += 1
        if sch.curve_every and ((epoch + 1) % sch.curve_every == 0 or epoch + 1 == sch.epochs):
            c_top1, c_nll = _evaluate(model, curve_x, curve_y)
            model.train()
            curve.append(dict(epoch=epoch + 1, train_loss=loss_sum / max(loss_n, 1), test_nll=c_nll, test_top1=c_top1))
    train_s = time.time() - t0
    top1, nll = _evaluate(model, data.test_x, data.test_y)
    train_top1, train_nll = _evaluate(model, data.train_x[:2000], data.train_y[:2000])
    vs_x = data.train_x[:spec.data.vs_images]
    records = variance_shift(model, list(vs_x.split(500)))
    rec = dict(
        arch=arch.name, config=config.name, seed=seed, fingerprint=_fingerprint(spec, arch, config),
        resolved_res_pos=resolved_position(model) if config.residual in (AUTO, AFTER_LAST_BN, BEFORE_LAST_CONV)
        else config.residual,
        top1=top1, nll=nll, vs_mean=shift_mean(records), vs_max=shift_max(records),
        vs_layers={r.name: round(r.metric, 5) for r in records},
        train_loss_last_epoch=loss_sum / max(loss_n, 1), train_nll=train_nll, train_top1=train_top1, steps=step,
        res_drop_rate=res_rate if config.residual else 0.0, head_drop_rate=head_rate if config.head else 0.0,
        **(dict(curve=curve) if curve else {}), train_s=round(train_s, 1),
        wall_s=round(time.time() - t0, 1), torch=torch.__version__, timm=timm.__version__,
        threads=torch.get_num_threads(), machine=platform.machine())
    log(f'{arch.name:>12} {config.name:>16} seed {seed}: top1 {top1:6.2f}  nll {nll:.4f}  '
        f'vs mean {rec["vs_mean"]:.3f} max {rec["vs_max"]:.3f}  ({rec["wall_s"]:.0f}s)')
    return rec


def _run_path(runs_dir: Path, arch: str, config: str, seed: int) -> Path:
    return runs_dir / arch / f'{config}_seed{seed}.json'


def run_ablation(
        spec: AblationSpec, runs_dir: str | os.PathLike, data: AblationData, *,
        log: Callable[[str], None] = print, only_arch: Optional[Sequence[str]] = None,
) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, str]]]:
    """Run every (architecture, configuration, seed) that has no result JSON yet; return all records.

    Seeds are the outer loop, so an ablation stopped early has complete seeds rather than complete configs.
    A JSON written under a different specification (fingerprint mismatch) is an error, not silently reused.
    Several processes can share one ``runs_dir``: each run is claimed with a ``.claim`` file holding the
    pid, and a run claimed by another live process is skipped (and missing from the returned records).

    Args:
        spec: the ablation.
        runs_dir: where run records go, as ``<runs_dir>/<arch>/<config>_seed<seed>.json``.
        data: the in-memory data.
        log: progress messages.
        only_arch: run only the architectures with these names (None: all).

    Returns:
        ``(records, skipped)``: the records of this pass (existing and new), and per architecture
        ``{configuration: why it was left out}`` (see ``configs_for``).

    Raises:
        ValueError: if an existing record has another fingerprint or cannot be read, or a configuration is
            unknown.
        FloatingPointError: if a run's loss diverges (see ``run_one``).
    """
    runs_dir = Path(runs_dir)
    plan = []
    skipped: Dict[str, Dict[str, str]] = {}
    for arch in spec.architectures:
        if only_arch and arch.name not in only_arch:
            continue
        names, skipped[arch.name] = configs_for(arch, spec.configs)
        for name in names:
            plan.append((arch, get_config(name)))
    records = []
    for seed in spec.seeds:
        for arch, config in plan:
            path = _run_path(runs_dir, arch.name, config.name, seed)
            expected = _fingerprint(spec, arch, config)
            if not path.is_file() and not _claim(path):
                log(f'skip {arch.name}/{config.name}/seed {seed}: another live process is running it')
                continue
            if path.is_file():
                rec = read_json(path, 'run record')
                if rec.get('fingerprint') != expected:
                    raise ValueError(
                        f'{path} was written by a different ablation specification (fingerprint '
                        f'{rec.get("fingerprint")} != {expected}); delete it or choose another output folder')
                log(f'skip {arch.name}/{config.name}/seed {seed}: {path} exists')
            else:
                rec = run_one(spec, arch, config, seed, data, log=log)
                write_json_atomic(path, rec, indent=1, sort_keys=True)
                path.with_suffix('.claim').unlink(missing_ok=True)
            records.append(rec)
    return records, skipped


def _claim(path: Path) -> bool:
    """Reserve a run for this process (a ``.claim`` file holding the pid), so two workers can share a study.

    A claim whose process is gone (a killed worker) is taken over. Returns False if a live process holds it.
    """
    claim = path.with_suffix('.claim')
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(claim.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            if pid and _alive(pid):
                return False
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(str(os.getpid()))
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_records(runs_dir: str | os.PathLike) -> List[Dict[str, Any]]:
    """Read every run record under ``runs_dir``, to re-make the report without training.

    Args:
        runs_dir: the folder of ``<arch>/<config>_seed<seed>.json`` files; a missing folder gives no records.

    Returns:
        The records, sorted by path.

    Raises:
        ValueError: if a record cannot be read or is not valid JSON.
    """
    return [read_json(p, 'run record') for p in sorted(Path(runs_dir).glob('*/*.json'))]
