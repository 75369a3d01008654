"""A study's specification (one YAML file): what to train, which dropout settings, which seeds, what to compare.

A study is a paired comparison of dropout configurations on one dataset. Every run goes through the product's
trainer (:func:`timm_dropres.training.trainer.finetune`) with the options of ``train:`` (any
``dropres-finetune`` option the engine does not set itself), so a study measures exactly what a user trains.

Example ``study.yaml``::

    name: my-data
    seeds: 12                       # or a list; each seed fixes init weights, data order and augmentation
    data: {dataset: /data/flowers, val_fraction: 0.1}
    train: {epochs: 20, opt: adamw, lr: 1.0e-3, batch_size: 32}
    architectures:
      - {name: r18, model: resnet18_dropres, pretrained: true}
    configs:
      none: {}                      # every rate is 0 unless a configuration sets it
      head: {drop_rate: 0.1}
      residual: {res_drop_rate: 0.1}
    comparisons:
      main: [[head, none], [residual, none]]

Unknown keys are errors, so a typo cannot pass silently; every value is validated before anything runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..models.layers import RES_DROP_POSITIONS, check_rate
from ..training.config import FinetuneConfig

__all__ = ['HAZARDS', 'ENGINE_KEYS', 'ArchSpec', 'ConfigSpec', 'DataSpec', 'PretrainSpec', 'StudySpec', 'Run',
           'load_study_spec', 'parse_study_spec', 'plan_runs', 'run_fingerprint']

#: dropout placements the public API refuses (the guideline warns against them); a study may measure them, placed
#: by :mod:`timm_dropres.research.ablation`'s hooks. ``head_after_pool`` is timm's own placement, via a hook so
#: that it can be combined with a dropres model's residual dropout.
HAZARDS = ('before_every_bn', 'after_add', 'head_after_pool')

#: FinetuneConfig fields the engine sets per run; a spec's ``train:`` must not set them
ENGINE_KEYS = ('model', 'pretrained', 'pretrained_file', 'drop_rate', 'res_drop_rate', 'res_drop_pos',
               'drop_path_rate', 'model_kwargs', 'dataset', 'data_dir', 'download', 'val_fraction', 'train_subset',
               'val_subset', 'img_size', 'seed', 'output_dir', 'overwrite', 'resume', 'progress')


def _check_plain_name(what: str, name: object) -> None:
    """Names become file and folder names (records, report): a plain, non-empty name, no path in it."""
    if not isinstance(name, str) or not name or '/' in name or '\\' in name or name.startswith('.'):
        raise ValueError(f'{what} name must be a plain file name (no "/", "\\" or leading "."), got {name!r}')


def _from_mapping(cls: type, values: Any, where: str) -> Any:
    """``cls(**values)`` with unknown keys refused by name (and the valid keys listed)."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ValueError(f'{where}: expected a mapping, got {type(values).__name__} {values!r}')
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f'{where}: unknown keys {unknown}; valid: {valid}')
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from None


@dataclass(frozen=True)
class ArchSpec:
    """One network of the study.

    Attributes:
        name: short unique name (run paths, reports).
        model: a timm model name; a ``*_dropres`` one for residual dropout.
        base: the plain timm model for configurations with ``timm: true`` (default: ``model`` without
            ``_dropres``).
        model_kwargs: extra ``timm.create_model`` keyword arguments.
        pretrained: start from the model's pretrained weights (timm / Hub).
        img_size: input resolution (default: the model's).
        stem_stride: adapt an ImageNet stem to tiny inputs (:func:`timm_dropres.research.ablation.small_input_stem`):
            first conv at this stride, no max-pool.
        skip_configs: configurations not run on this network, each with the reason the report gives (e.g. a
            position that is the same network as another one here).
        label: description shown in the report.
    """

    name: str
    model: str
    base: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    img_size: Optional[int] = None
    stem_stride: Optional[int] = None
    skip_configs: Dict[str, str] = field(default_factory=dict)
    label: str = ''

    def __post_init__(self) -> None:
        if not isinstance(self.skip_configs, Mapping) or not all(isinstance(v, str) and v
                                                                 for v in self.skip_configs.values()):
            raise ValueError(f'{self.name}: skip_configs maps a configuration name to the reason it is not run')
        _check_plain_name('architecture', self.name)
        if self.stem_stride not in (None, 1, 2):
            raise ValueError(f'{self.name}: stem_stride must be 1, 2 or null, got {self.stem_stride!r}')

    @property
    def base_model(self) -> str:
        """The plain timm twin (``base``, else ``model`` without the ``_dropres`` suffix)."""
        if self.base:
            return self.base
        head, dot, tag = self.model.partition('.')
        return head.removesuffix('_dropres') + dot + tag


@dataclass(frozen=True)
class ConfigSpec:
    """One dropout configuration. Every rate is 0 unless set, so a configuration is exactly what it names.

    Attributes:
        name: the configuration's name (its key in ``configs:``).
        drop_rate: head dropout (dropres models: before global pooling; ``timm: true``: timm's own, after it).
        res_drop_rate: residual dropout in every block (dropres models only).
        res_drop_pos: residual dropout position (``auto`` unless set).
        drop_path_rate: stochastic depth, as timm's ``drop_path_rate``.
        hazard: a placement the public API refuses (``before_every_bn``, ``after_add``, ``head_after_pool``),
            added with a hook at ``hazard_rate``.
        hazard_rate: the hazard's rate.
        timm: train the architecture's plain timm model (``base``) instead of the dropres one: the baseline
            a user has today.
        seeds: this configuration's seed count (or list), instead of the study's (e.g. fewer for placements
            whose effect is large).
        label: description shown in the report.
    """

    name: str
    drop_rate: float = 0.0
    res_drop_rate: float = 0.0
    res_drop_pos: Optional[str] = None
    drop_path_rate: float = 0.0
    hazard: Optional[str] = None
    hazard_rate: float = 0.0
    timm: bool = False
    seeds: Any = None
    label: str = ''

    def __post_init__(self) -> None:
        _check_plain_name('configuration', self.name)
        for k in ('drop_rate', 'res_drop_rate', 'drop_path_rate', 'hazard_rate'):
            check_rate(f'{self.name}: {k}', getattr(self, k))
        if self.res_drop_pos is not None and self.res_drop_pos not in RES_DROP_POSITIONS:
            raise ValueError(f'{self.name}: res_drop_pos must be one of {list(RES_DROP_POSITIONS)}, '
                             f'got {self.res_drop_pos!r}')
        if self.hazard is not None and self.hazard not in HAZARDS:
            raise ValueError(f'{self.name}: hazard must be one of {list(HAZARDS)}, got {self.hazard!r}')
        if (self.hazard is None) != (self.hazard_rate == 0.0):
            raise ValueError(f'{self.name}: hazard and hazard_rate go together (got hazard={self.hazard!r}, '
                             f'hazard_rate={self.hazard_rate})')
        if self.timm and (self.res_drop_rate or self.res_drop_pos):
            raise ValueError(f'{self.name}: timm: true trains the plain timm model, which has no residual dropout; '
                             'drop res_drop_rate/res_drop_pos or timm')
        if self.seeds is not None:
            object.__setattr__(self, 'seeds', _seed_list(self.seeds, f'configs.{self.name}.seeds'))

    @property
    def dropout(self) -> Dict[str, Any]:
        """The dropout settings alone (what distinguishes configurations; enters the run fingerprint)."""
        return {k: v for k, v in asdict(self).items() if k not in ('name', 'seeds', 'label')}


@dataclass(frozen=True)
class DataSpec:
    """The data every run shares: splits and subsets are drawn once, with ``seed``, identical for all runs.

    Training and validation images come from the dataset's training split (``val_fraction`` of it held out,
    class-balanced); the **test** split (the dataset's own test/validation split, or ``<root>/test`` or
    ``<root>/val`` of an ImageFolder) is read once per run, after training. Model choice uses validation only.

    Attributes:
        dataset: anything ``dropres-finetune --dataset`` accepts: an ImageFolder root (with ``train/`` and
            ``test/`` or ``val/``), a timm dataset name, or ``fashion_mnist``.
        data_dir: root folder for timm dataset names.
        download: let torchvision download ``torch/*`` datasets.
        val_fraction: validation hold-out fraction of the training split.
        train_subset: a class-balanced training subset of this many images (null: all).
        val_subset: a class-balanced subset of the held-out validation images.
        test_subset: a class-balanced subset of the test split (null: all).
        classes: train and test on these classes only (label names or indices, relabelled 0..k-1).
        test_split: the split name for the test set (default: ``test``; timm datasets: ``validation``).
        seed: the seed of every split and subset draw.
        in_memory: the fast path: decode and preprocess every image once (eval transform at the model's
            resolution) and train on tensors, with ``augment`` on tensors instead of the trainer's transforms.
        augment: in-memory augmentation: ``pad`` (random translation by up to this many pixels, padding with
            black) and ``hflip`` (flip probability); ``{}`` for none.
        subset_per_seed: draw the subsets with ``seed + <run seed>``, so each seed trains on its own subset (the
            same for every configuration of that seed): few-shot studies then do not rest on one draw.
    """

    dataset: str = ''
    data_dir: Optional[str] = None
    download: bool = False
    val_fraction: float = 0.1
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    test_subset: Optional[int] = None
    classes: Optional[Tuple[Any, ...]] = None
    test_split: Optional[str] = None
    seed: int = 0
    in_memory: bool = False
    augment: Dict[str, float] = field(default_factory=dict)
    subset_per_seed: bool = False

    def for_seed(self, seed: int) -> DataSpec:
        """The data of run seed ``seed``: this spec, or with ``subset_per_seed`` its subsets drawn for that seed."""
        return dataclasses.replace(self, seed=self.seed + seed, subset_per_seed=False) if self.subset_per_seed else self

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError('data.dataset is missing (an ImageFolder root, a timm dataset name or fashion_mnist)')
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f'data.val_fraction must be in (0, 1), got {self.val_fraction}')
        for k in ('train_subset', 'val_subset', 'test_subset'):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f'data.{k} must be a positive number of images or null, got {v!r}')
        if self.classes is not None:
            object.__setattr__(self, 'classes', tuple(self.classes))
            if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
                raise ValueError(f'data.classes must name at least two distinct classes, got {list(self.classes)}')
        unknown = sorted(set(self.augment) - {'pad', 'hflip'})
        if unknown:
            raise ValueError(f'data.augment: unknown keys {unknown}; valid: [hflip, pad]')
        if self.augment and not self.in_memory:
            raise ValueError('data.augment is the in-memory path\'s tensor augmentation; without in_memory: true, '
                             'set the trainer\'s augmentation in train: (hflip, scale, pad_crop, aa, ...)')
        pad, flip = self.augment.get('pad', 0), self.augment.get('hflip', 0.0)
        if not isinstance(pad, int) or pad < 0:
            raise ValueError(f'data.augment.pad must be a whole number of pixels >= 0, got {pad!r}')
        if not 0.0 <= float(flip) <= 1.0:
            raise ValueError(f'data.augment.hflip must be in [0, 1], got {flip!r}')


@dataclass(frozen=True)
class PretrainSpec:
    """An optional pretraining stage (transfer studies): each architecture is trained once, without dropout,
    through the same trainer, on ``data``; every run of the study then starts from those weights (with a new
    classifier).

    Attributes:
        data: the pretraining data (a ``DataSpec`` mapping).
        train: trainer options of the pretraining run (``train:`` keys).
        seed: the pretraining run's seed.
    """

    data: DataSpec
    train: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class Run:
    """One (architecture, configuration, seed) of a study."""

    arch: ArchSpec
    config: ConfigSpec
    seed: int

    @property
    def key(self) -> str:
        return f'{self.arch.name}/{self.config.name}/seed{self.seed}'


@dataclass(frozen=True)
class StudySpec:
    """Everything that defines a study (one YAML file).

    Attributes:
        name: the study's name (report title, default folders).
        architectures: the networks.
        configs: the dropout configurations, in report order.
        seeds: the seeds every configuration runs (a count ``n`` means ``0..n-1``), unless it sets its own.
        data: the data (see ``DataSpec``).
        train: ``dropres-finetune`` options shared by every run (``train:`` keys; see ``ENGINE_KEYS``).
        comparisons: families of ``[a, b]`` pairs (``a - b``); Holm's correction runs within each family.
        pretrain: an optional pretraining stage (see ``PretrainSpec``).
        select: the weights a run is tested with: ``last`` (the last epoch) or ``best`` (best validation top-1).
        alpha: family-wise error rate.
        power: the power of the minimum detectable effect.
        effect: the effect of interest in top-1 points: the report's seed calculator says how many seeds
            resolve it.
        out_dir: records (``records/``) and the report (default ``runs/study/<name>``).
        work_dir: the trainer's run folders, deleted when a run is recorded (default ``<out_dir>/work``).
        title: the report's title.
        header: markdown placed under the title (what the study is for).
    """

    name: str
    architectures: Tuple[ArchSpec, ...]
    configs: Tuple[ConfigSpec, ...]
    data: DataSpec
    seeds: Tuple[int, ...] = (0, 1, 2)
    train: Dict[str, Any] = field(default_factory=dict)
    comparisons: Dict[str, Tuple[Tuple[str, str], ...]] = field(default_factory=dict)
    pretrain: Optional[PretrainSpec] = None
    select: str = 'last'
    alpha: float = 0.05
    power: float = 0.8
    effect: float = 0.5
    out_dir: Optional[str] = None
    work_dir: Optional[str] = None
    title: str = ''
    header: str = ''

    def __post_init__(self) -> None:
        _check_plain_name('study', self.name)
        if not self.architectures:
            raise ValueError('architectures is empty: name at least one')
        if not self.configs:
            raise ValueError('configs is empty: name at least two to compare')
        for what, names in (('architecture', [a.name for a in self.architectures]),
                            ('configuration', [c.name for c in self.configs])):
            if len(set(names)) != len(names):
                raise ValueError(f'{what} names must be unique, got {names}')
        names = {c.name for c in self.configs}
        for arch in self.architectures:
            bad = sorted(set(arch.skip_configs) - names)
            if bad:
                raise ValueError(f'architectures.{arch.name}.skip_configs: unknown configurations {bad}; valid: '
                                 f'{sorted(names)}')
        for family, pairs in self.comparisons.items():
            for pair in pairs:
                if len(pair) != 2 or pair[0] == pair[1]:
                    raise ValueError(f'comparisons.{family}: each entry is [a, b] with a != b, got {list(pair)}')
                bad = [n for n in pair if n not in names]
                if bad:
                    raise ValueError(f'comparisons.{family}: unknown configurations {bad}; valid: {sorted(names)}')
        if self.select not in ('last', 'best'):
            raise ValueError(f"select must be 'last' or 'best', got {self.select!r}")
        if not 0.0 < self.alpha < 1.0 or not 0.0 < self.power < 1.0 or not self.effect > 0:
            raise ValueError(f'alpha and power must be in (0, 1) and effect > 0, got alpha={self.alpha}, '
                             f'power={self.power}, effect={self.effect}')
        check_train_options(self.train, 'train')
        if self.pretrain is not None:
            check_train_options(self.pretrain.train, 'pretrain.train')

    def seeds_of(self, config: ConfigSpec) -> Tuple[int, ...]:
        """The seeds ``config`` runs."""
        return tuple(config.seeds) if config.seeds is not None else self.seeds

    def config(self, name: str) -> ConfigSpec:
        return next(c for c in self.configs if c.name == name)

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir or f'runs/study/{self.name}')

    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else self.resolved_out_dir() / 'work'


def check_train_options(train: Mapping[str, Any], where: str) -> FinetuneConfig:
    """Validate ``train:`` as ``FinetuneConfig`` options, refusing the ones the engine sets per run.

    Returns:
        A ``FinetuneConfig`` with those options (and the trainer's defaults for the rest).
    """
    if not isinstance(train, Mapping):
        raise ValueError(f'{where}: expected a mapping of dropres-finetune options, got {train!r}')
    owned = sorted(set(train) & set(ENGINE_KEYS))
    if owned:
        raise ValueError(f'{where}: {owned} are set by the study per run (architectures, configs, data, seeds); '
                         'remove them from ' + where)
    valid = [f.name for f in dataclasses.fields(FinetuneConfig)]
    unknown = sorted(set(train) - set(valid))
    if unknown:
        raise ValueError(f'{where}: unknown dropres-finetune options {unknown}; valid: '
                         f'{sorted(set(valid) - set(ENGINE_KEYS))}')
    try:
        return FinetuneConfig(**dict(train), model='resnet18', dataset='x')
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from None


def _seed_list(value: Any, where: str) -> Tuple[int, ...]:
    if isinstance(value, bool):
        raise ValueError(f'{where}: a seed count or a list of seeds, got {value!r}')
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f'{where}: a seed count must be >= 1, got {value}')
        return tuple(range(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in value):
        if len(set(value)) != len(value):
            raise ValueError(f'{where}: repeated seeds in {list(value)}')
        return tuple(value)
    raise ValueError(f'{where}: a seed count or a non-empty list of whole numbers, got {value!r}')


def parse_study_spec(raw: Mapping[str, Any], where: str = 'study') -> StudySpec:
    """Build a ``StudySpec`` from a mapping (a parsed YAML file).

    Args:
        raw: the mapping.
        where: how errors name its source (the file).

    Returns:
        The validated spec.

    Raises:
        ValueError: naming the key and the valid values.
    """
    raw = dict(raw)
    archs = raw.pop('architectures', None) or []
    if not isinstance(archs, list):
        raise ValueError(f'{where}: architectures must be a list of mappings')
    archs = tuple(_from_mapping(ArchSpec, a, f'{where}: architectures[{i}]') for i, a in enumerate(archs))
    configs = raw.pop('configs', None) or {}
    if not isinstance(configs, Mapping):
        raise ValueError(f'{where}: configs must be a mapping of name -> settings')
    configs = tuple(_from_mapping(ConfigSpec, dict(v or {}, name=str(k)), f'{where}: configs.{k}')
                    for k, v in configs.items())
    data = _from_mapping(DataSpec, raw.pop('data', None), f'{where}: data')
    pre = raw.pop('pretrain', None)
    if pre is not None:
        pre = dict(pre)
        pre['data'] = _from_mapping(DataSpec, pre.get('data'), f'{where}: pretrain.data')
        pre = _from_mapping(PretrainSpec, pre, f'{where}: pretrain')
    comps = raw.pop('comparisons', None) or {}
    if not isinstance(comps, Mapping):
        raise ValueError(f'{where}: comparisons must map a family name to a list of [a, b] pairs')
    comps = {str(k): tuple(tuple(p) for p in (v or [])) for k, v in comps.items()}
    if 'seeds' in raw:
        raw['seeds'] = _seed_list(raw['seeds'], f'{where}: seeds')
    if 'name' not in raw:
        raise ValueError(f'{where}: name is missing (the study\'s name: folders and report title)')
    return _from_mapping(StudySpec, dict(raw, architectures=archs, configs=configs, data=data, pretrain=pre,
                                         comparisons=comps), where)


def load_study_spec(path: str | os.PathLike) -> StudySpec:
    """Read and validate a study YAML file (see the module docstring for its keys).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the YAML is not a mapping, a key is given twice or unknown, or a value invalid.
    """
    import yaml

    from ..strict_yaml import safe_load_strict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f'study spec {p} does not exist')
    try:
        raw = safe_load_strict(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{p}: not valid YAML ({e})') from None
    if not isinstance(raw, dict):
        raise ValueError(f'{p}: expected a mapping at the top level, got {type(raw).__name__}')
    return parse_study_spec(raw, str(p))


def plan_runs(spec: StudySpec, only_arch: Sequence[str] | None = None) -> List[Run]:
    """Every run of the study, seeds outermost (a study stopped early has whole seeds, not whole configurations).

    Raises:
        ValueError: ``only_arch`` names an unknown architecture.
    """
    names = [a.name for a in spec.architectures]
    if only_arch:
        bad = sorted(set(only_arch) - set(names))
        if bad:
            raise ValueError(f'--only-arch {bad}: not an architecture of this study; valid: {names}')
    archs = [a for a in spec.architectures if not only_arch or a.name in only_arch]
    seeds = sorted({s for c in spec.configs for s in spec.seeds_of(c)})
    return [Run(a, c, s) for s in seeds for a in archs for c in spec.configs
            if s in spec.seeds_of(c) and c.name not in a.skip_configs]


def run_fingerprint(spec: StudySpec, run: Run) -> str:
    """What makes a record belong to this study: everything that defines the run except its seed."""
    arch = {k: v for k, v in asdict(run.arch).items() if k != 'label'}
    payload = dict(arch=arch, config=run.config.dropout, data=asdict(spec.data), train=spec.train,
                   select=spec.select, pretrain=asdict(spec.pretrain) if spec.pretrain else None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
