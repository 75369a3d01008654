"""The ablation specification: the YAML file as frozen dataclasses, validated when read."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from ...models.layers import check_rate
from .configs import CONFIGS, get_config

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

    from ...strict_yaml import safe_load_strict
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


