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

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .analysis import shift_max, shift_mean, variance_shift
from .blocks import block_norms
from .convert import residual_blocks
from .layers import AFTER_LAST_BN, AUTO, BEFORE_LAST_CONV, check_rate

__all__ = [
    'AblationConfig', 'CONFIGS', 'get_config', 'AblationDropout', 'place_before_every_bn', 'place_after_add',
    'place_head_after_pool', 'small_input_stem', 'ArchSpec', 'Schedule', 'DataSpec', 'AblationSpec',
    'load_spec', 'AblationData', 'load_fmnist_data', 'build_model', 'configs_for', 'run_one', 'run_ablation',
    'Comparison', 'compare', 'summarize', 'pair_comparisons', 'markdown_tables', 'write_report', 'read_records',
    'KEEP_MARKER',
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
    """One placement: where residual dropout goes (or None) and where head dropout goes (or None)."""

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
    AblationConfig('default', AUTO, HEAD_BEFORE, "dropres default: residual at 'auto' + head before pool"),
    AblationConfig('after_last_bn', AFTER_LAST_BN, None, 'residual after the last BN (before the addition)'),
    AblationConfig('before_last_conv', BEFORE_LAST_CONV, None, 'residual before the last conv'),
    AblationConfig(BEFORE_EVERY_BN, BEFORE_EVERY_BN, None, 'hazard: dropout before every BN of the branch'),
    AblationConfig(AFTER_ADD, AFTER_ADD, None, 'hazard: dropout on the block output (after the addition)'),
    AblationConfig('head_after_pool', None, HEAD_AFTER, "head dropout after pooling (timm's drop_rate)"),
    AblationConfig('head_before_pool', None, HEAD_BEFORE, 'head dropout before pooling (paper)'),
)}


def get_config(name: str) -> AblationConfig:
    """A configuration by name; ``'<name>@<p>'`` is that configuration with both its rates set to ``p``
    (a rate sweep inside one ablation, e.g. ``default@0.1``)."""
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


def _config_order(name: str) -> Tuple[int, float]:
    base, _, rate = name.partition('@')
    return list(CONFIGS).index(base), float(rate) if rate else -1.0


# ----------------------------------------------------------------------------------------------------------
# ablation-only dropout placements (hooks; never part of the public API)
# ----------------------------------------------------------------------------------------------------------

class AblationDropout(nn.Dropout):
    """Inverted dropout that a hook applies; a child of the hooked module so ``train()``/``eval()`` reach it."""

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
    """Drop the input of every BN inside every residual branch (forward pre-hooks). Returns the hooked BNs.

    The hook replaces only the BN's input: a pre-activation block's shortcut still sees the undropped tensor.
    """
    hooked = []
    for _, block in residual_blocks(model):
        for norm in block_norms(block).values():
            norm.ablation_drop = AblationDropout(p, 'before_bn')
            norm.register_forward_pre_hook(_drop_first_arg)
            hooked.append(norm)
    return hooked


def place_after_add(model: nn.Module, p: float) -> List[nn.Module]:
    """Drop every residual block's output, i.e. after the addition (and the post-activation ReLU)."""
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
    """Drop the pooled features (what timm's ``drop_rate`` does), via a hook on the global pool."""
    pool = _global_pool(model)
    pool.ablation_drop = AblationDropout(p, 'head_after_pool')
    pool.register_forward_hook(_drop_output)
    return pool


def small_input_stem(model: nn.Module, stride: int) -> nn.Module:
    """Adapt an ImageNet stem to 28x28 inputs: first conv at ``stride``, no max-pool (weights unchanged).

    timm's ResNet/ResNetV2 have no option for this (their stems always reduce by 4), and at 28x28 that
    would leave a 1x1 final map on which head dropout before and after pooling are the same thing.
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
    """One architecture: a timm ``*_dropres`` name, extra create_model kwargs, and the stem adaptation."""

    name: str
    model: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    stem_stride: Optional[int] = None
    label: str = ''


@dataclass(frozen=True)
class Schedule:
    """Training schedule, identical for every configuration and seed."""

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


@dataclass(frozen=True)
class DataSpec:
    """Fashion-MNIST subset: ``train_subset`` training images (None = all 60k), ``test_subset`` (None = all 10k).

    The subsets are drawn once with ``data_seed`` and shared by every run; ``vs_images`` training images
    (unaugmented) feed the variance-shift measurement.
    """

    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    data_seed: int = 0
    vs_images: int = 2000


@dataclass(frozen=True)
class AblationSpec:
    """Everything that defines an ablation; ``fingerprint`` of a run is derived from it."""

    architectures: Tuple[ArchSpec, ...]
    configs: Tuple[str, ...] = tuple(CONFIGS)
    seeds: Tuple[int, ...] = (0, 1, 2)
    res_drop_rate: float = 0.2
    head_drop_rate: float = 0.2
    schedule: Schedule = Schedule()
    data: DataSpec = DataSpec()
    significance_k: float = 2.0

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


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f'{where}: unknown keys {unknown}; valid: {valid}')
    return cls(**values)


def load_spec(path: str | os.PathLike) -> AblationSpec:
    """Read an ablation YAML (see ``configs/ablation_fmnist.yaml``); unknown keys are errors, not ignored."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: expected a mapping at the top level, got {type(raw).__name__}')
    raw = dict(raw)
    archs = tuple(_build(ArchSpec, a, f'{path}: architectures[{i}]')
                  for i, a in enumerate(raw.pop('architectures', []) or []))
    schedule = _build(Schedule, raw.pop('schedule', {}) or {}, f'{path}: schedule')
    data = _build(DataSpec, raw.pop('data', {}) or {}, f'{path}: data')
    for key in ('configs', 'seeds'):
        if key in raw:
            raw[key] = tuple(raw[key])
    return _build(AblationSpec, dict(raw, architectures=archs, schedule=schedule, data=data), str(path))


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------

@dataclass
class AblationData:
    """Normalized float tensors ``[N, 1, H, W]`` and int64 labels; ``pad_value`` is the normalized black."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    pad_value: float = 0.0
    num_classes: int = 10


def load_fmnist_data(spec: DataSpec, root: Optional[str | os.PathLike] = None) -> AblationData:
    """Fashion-MNIST as in-memory tensors, normalized once with the full training split's mean/std."""
    from .fmnist import load_fashion_mnist

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

    tr_x, tr_y = subset(tr_x, tr_y, spec.train_subset, 'train')
    te_x, te_y = subset(te_x, te_y, spec.test_subset, 'test')

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - mean) / std).unsqueeze(1).contiguous()

    return AblationData(norm(tr_x), tr_y, norm(te_x), te_y, pad_value=-mean / std, num_classes=10)


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

def _resolved_position(model: nn.Module) -> Optional[str]:
    blocks = list(residual_blocks(model))
    return blocks[0][1].res_drop_pos if blocks else None


def build_model(
        arch: ArchSpec, config: AblationConfig, *, res_drop_rate: float, head_drop_rate: float, num_classes: int = 10,
        in_chans: int = 1,
) -> nn.Module:
    """The network for one configuration; identical parameters for every configuration at a given RNG state."""
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
    """The configurations that are distinct networks for ``arch``, and why any others were left out.

    A pre-activation branch has one candidate position, so 'after_last_bn' resolves to 'before_last_conv'
    and would train the same network twice.
    """
    probe = build_model(arch, CONFIGS['after_last_bn'], res_drop_rate=0.1, head_drop_rate=0.0)
    skipped: Dict[str, str] = {}
    if _resolved_position(probe) == BEFORE_LAST_CONV:
        for name in names:
            base, sep, rate = name.partition('@')
            if base == 'after_last_bn' and 'before_last_conv' + sep + rate in names:
                skipped[name] = ("resolves to 'before_last_conv' in this architecture (one candidate position)")
    return [n for n in names if n not in skipped], skipped


def _rates(spec: AblationSpec, config: AblationConfig) -> Tuple[float, float]:
    if config.rate is not None:
        return config.rate, config.rate
    return spec.res_drop_rate, spec.head_drop_rate


def _fingerprint(spec: AblationSpec, arch: ArchSpec, config: AblationConfig) -> str:
    cfg = {k: v for k, v in asdict(config).items() if k != 'rate' or v is not None}
    res_rate, head_rate = _rates(spec, config)
    payload = dict(arch=asdict(arch), config=cfg, schedule=asdict(spec.schedule), data=asdict(spec.data),
                   res_drop_rate=res_rate, head_drop_rate=head_rate)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> Tuple[float, float]:
    model.eval()
    correct, nll = 0, 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        nll += F.cross_entropy(logits, yb, reduction='sum').item()
        correct += (logits.argmax(1) == yb).sum().item()
    return 100.0 * correct / len(x), nll / len(x)


def run_one(
        spec: AblationSpec, arch: ArchSpec, config: AblationConfig, seed: int, data: AblationData,
        log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train, evaluate and measure one (architecture, configuration, seed); return its record.

    ``seed`` fixes the initial weights (the same for every configuration, since dropout adds no parameters),
    the data order and augmentation (a dedicated generator, so dropout masks cannot perturb it), and the
    dropout masks (the global RNG, re-seeded after the model is built).
    """
    t0 = time.time()
    sch = spec.schedule
    torch.manual_seed(seed)
    res_rate, head_rate = _rates(spec, config)
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
    for _ in range(sch.epochs):
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
    train_s = time.time() - t0
    top1, nll = _evaluate(model, data.test_x, data.test_y)
    vs_x = data.train_x[:spec.data.vs_images]
    records = variance_shift(model, list(vs_x.split(500)))
    rec = dict(
        arch=arch.name, config=config.name, seed=seed, fingerprint=_fingerprint(spec, arch, config),
        resolved_res_pos=_resolved_position(model) if config.residual in (AUTO, AFTER_LAST_BN, BEFORE_LAST_CONV)
        else config.residual,
        top1=top1, nll=nll, vs_mean=shift_mean(records), vs_max=shift_max(records),
        vs_layers={r.name: round(r.metric, 5) for r in records},
        train_loss_last_epoch=loss_sum / max(loss_n, 1), steps=step, train_s=round(train_s, 1),
        wall_s=round(time.time() - t0, 1), torch=torch.__version__, timm=timm.__version__,
        threads=torch.get_num_threads(), machine=platform.machine())
    log(f'{arch.name:>12} {config.name:>16} seed {seed}: top1 {top1:6.2f}  nll {nll:.4f}  '
        f'vs mean {rec["vs_mean"]:.3f} max {rec["vs_max"]:.3f}  ({rec["wall_s"]:.0f}s)')
    return rec


def _run_path(runs_dir: Path, arch: str, config: str, seed: int) -> Path:
    return runs_dir / arch / f'{config}_seed{seed}.json'


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f'.tmp{os.getpid()}')
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + '\n')
    os.replace(tmp, path)


def run_ablation(
        spec: AblationSpec, runs_dir: str | os.PathLike, data: AblationData, *,
        log: Callable[[str], None] = print, only_arch: Optional[Sequence[str]] = None,
) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, str]]]:
    """Run every (architecture, configuration, seed) that has no result JSON yet; return all records.

    Seeds are the outer loop, so an ablation stopped early has complete seeds rather than complete configs.
    A JSON written under a different specification (fingerprint mismatch) is an error, not silently reused.
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
            if path.is_file():
                rec = json.loads(path.read_text())
                if rec.get('fingerprint') != expected:
                    raise ValueError(
                        f'{path} was written by a different ablation specification (fingerprint '
                        f'{rec.get("fingerprint")} != {expected}); delete it or choose another output folder')
                log(f'skip {arch.name}/{config.name}/seed {seed}: {path} exists')
            else:
                rec = run_one(spec, arch, config, seed, data, log=log)
                _write_json_atomic(path, rec)
            records.append(rec)
    return records, skipped


def read_records(runs_dir: str | os.PathLike) -> List[Dict[str, Any]]:
    """Every run JSON under ``runs_dir`` (for re-making the report without training)."""
    return [json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob('*/*.json'))]


# ----------------------------------------------------------------------------------------------------------
# statistics and report
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """``diff`` = mean(a) - mean(b); significant iff ``|diff| >= k * pooled_std`` (None: fewer than 2 seeds)."""

    diff: float
    pooled_std: Optional[float]
    significant: Optional[bool]

    def mark(self, fmt: str = '+.2f') -> str:
        if self.significant is None:
            return f'{self.diff:{fmt}} (n/a)'
        return f'{self.diff:{fmt}} *' if self.significant else f'{self.diff:{fmt}} (n.s.)'


def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float('nan')
    return m, s


def compare(a: Sequence[float], b: Sequence[float], k: float = 2.0) -> Comparison:
    """Is mean(a) - mean(b) larger than the seed spread?

    The pooled sample std s_p of the two groups is the seed spread; a difference counts only if
    ``|diff| >= k * s_p``. With 3 seeds each and k = 2 this is a two-sample t of at least 2.45
    (4 degrees of freedom, two-sided p of about 0.07): deliberately a low bar that still rejects
    differences inside the spread of the seeds.
    """
    if not a or not b:
        raise ValueError('compare needs at least one value in each group')
    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff, None, None)
    (_, sa), (_, sb) = _mean_std(a), _mean_std(b)
    pooled = math.sqrt(((len(a) - 1) * sa ** 2 + (len(b) - 1) * sb ** 2) / (len(a) + len(b) - 2))
    significant = abs(diff) >= k * pooled if pooled > 0 else diff != 0
    return Comparison(diff, pooled, significant)


METRICS = ('top1', 'nll', 'vs_mean', 'vs_max')
#: Pairs compared besides "vs none": the two public residual positions, the two head positions.
PAIRS = (('after_last_bn', 'before_last_conv'), ('head_before_pool', 'head_after_pool'))


def summarize(records: Iterable[Mapping[str, Any]], k: float = 2.0) -> List[Dict[str, Any]]:
    """One row per (architecture, configuration): n, mean/std of every metric, and the diff vs 'none'."""
    groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r['arch'], r['config']), []).append(r)
    rows = []
    for (arch, config), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], _config_order(kv[0][1]))):
        row: Dict[str, Any] = dict(arch=arch, config=config, n=len(recs), seeds=sorted(r['seed'] for r in recs),
                                   resolved_res_pos=recs[0].get('resolved_res_pos'))
        for m in METRICS:
            row[f'{m}_mean'], row[f'{m}_std'] = _mean_std([r[m] for r in recs])
            row[f'{m}_values'] = [r[m] for r in sorted(recs, key=lambda r: r['seed'])]
        base = groups.get((arch, 'none'))
        for m in METRICS:
            c = compare([r[m] for r in recs], [r[m] for r in base], k) if base and config != 'none' else None
            row[f'{m}_vs_none'] = c
        rows.append(row)
    return rows


def pair_comparisons(rows: Sequence[Mapping[str, Any]], k: float = 2.0) -> List[Dict[str, Any]]:
    """``PAIRS`` comparisons for every architecture that ran both members."""
    by = {(r['arch'], r['config']): r for r in rows}
    out = []
    for arch in sorted({r['arch'] for r in rows}):
        for a, b in PAIRS:
            if (arch, a) in by and (arch, b) in by:
                out.append(dict(arch=arch, a=a, b=b, **{
                    m: compare(by[(arch, a)][f'{m}_values'], by[(arch, b)][f'{m}_values'], k) for m in METRICS}))
    return out


def _fmt(mean: float, std: float, digits: int) -> str:
    return f'{mean:.{digits}f} ± {std:.{digits}f}' if math.isfinite(std) else f'{mean:.{digits}f}'


_DIGITS = dict(top1=2, nll=4, vs_mean=3, vs_max=3)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    cols = ['arch', 'config', 'n', 'resolved_res_pos']
    for m in METRICS:
        cols += [f'{m}_mean', f'{m}_std', f'{m}_diff_vs_none', f'{m}_significant_vs_none']
    tmp = path.with_suffix('.csv.tmp')
    with open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            line = [r['arch'], r['config'], r['n'], r['resolved_res_pos'] or '']
            for m in METRICS:
                c: Optional[Comparison] = r[f'{m}_vs_none']
                line += [f'{r[f"{m}_mean"]:.6g}', f'{r[f"{m}_std"]:.6g}',
                         '' if c is None else f'{c.diff:.6g}', '' if c is None or c.significant is None
                         else int(c.significant)]
            w.writerow(line)
    os.replace(tmp, path)


def markdown_tables(rows: Sequence[Mapping[str, Any]], k: float = 2.0) -> str:
    """The per-architecture results tables and the pair comparisons, in markdown."""
    lines = []
    for arch in sorted({r['arch'] for r in rows}):
        lines += [f'### {arch}', '',
                  '| configuration | n | top-1 % | Δ top-1 vs none | NLL | Δ NLL vs none | VS mean | VS max |',
                  '| --- | --- | --- | --- | --- | --- | --- | --- |']
        for r in (r for r in rows if r['arch'] == arch):
            name = r['config'] + (f" (→ {r['resolved_res_pos']})" if r['config'].partition('@')[0] == 'default' else '')
            cells = [name, str(r['n'])]
            for m in METRICS:
                cells.append(_fmt(r[f'{m}_mean'], r[f'{m}_std'], _DIGITS[m]))
                if m in ('top1', 'nll'):
                    c = r[f'{m}_vs_none']
                    cells.append('' if c is None else c.mark('+.2f' if m == 'top1' else '+.4f'))
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
    pairs = pair_comparisons(rows, k)
    if pairs:
        lines += ['### Pairwise', '', '| arch | a − b | Δ top-1 | Δ NLL | Δ VS mean | Δ VS max |',
                  '| --- | --- | --- | --- | --- | --- |']
        for p in pairs:
            lines.append(f"| {p['arch']} | {p['a']} − {p['b']} | {p['top1'].mark()} | {p['nll'].mark('+.4f')} | "
                         f"{p['vs_mean'].mark('+.3f')} | {p['vs_max'].mark('+.3f')} |")
        lines.append('')
    return '\n'.join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per architecture: top-1, NLL and variance-shift mean per configuration, mean ± std with seed dots."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    archs = sorted({r['arch'] for r in rows})
    metrics = (('top1', 'top-1 %'), ('nll', 'test NLL'), ('vs_mean', 'variance shift (mean over BN)'))
    fig, axes = plt.subplots(len(archs), 3, figsize=(15, 3.2 + 0.45 * len(CONFIGS) * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        rs = [r for r in rows if r['arch'] == arch]
        ys = list(range(len(rs)))[::-1]
        for j, (m, title) in enumerate(metrics):
            ax = axes[i][j]
            colors = []
            for r in rs:
                c = r[f'{m}_vs_none']
                colors.append('0.6' if r['config'] == 'none' else
                              ('tab:blue' if c is not None and c.significant else 'lightsteelblue'))
            means = [r[f'{m}_mean'] for r in rs]
            errs = [r[f'{m}_std'] if math.isfinite(r[f'{m}_std']) else 0.0 for r in rs]
            ax.barh(ys, means, xerr=errs, color=colors, capsize=3)
            for y, r in zip(ys, rs, strict=True):
                ax.plot(r[f'{m}_values'], [y] * len(r[f'{m}_values']), 'k.', ms=4)
            base = next((r for r in rs if r['config'] == 'none'), None)
            if base is not None:
                ax.axvline(base[f'{m}_mean'], color='k', ls='--', lw=0.8)
            lo = min(min(r[f'{m}_values']) for r in rs)
            hi = max(max(r[f'{m}_values']) for r in rs)
            pad = 0.15 * (hi - lo or abs(hi) * 0.01 or 1.0)
            ax.set_xlim(lo - pad - (max(errs) if m != 'vs_mean' else 0), hi + pad + max(errs))
            if m == 'vs_mean':
                ax.set_xlim(min(1.0, lo - pad), hi + pad + max(errs))
            ax.set_yticks(ys)
            ax.set_yticklabels([r['config'] for r in rs] if j == 0 else [])
            ax.set_title(f'{arch}: {title}', fontsize=9)
    fig.text(0.01, 0.005, 'dark blue: differs from "none" by >= 2 pooled seed std; light: within the seed spread; '
             'dots: seeds; dashed: "none"', fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    tmp = path.with_suffix('.tmp.png')
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


#: Text below this line in an existing report is kept when the report is regenerated.
KEEP_MARKER = '<!-- generated above; text below this line is kept when the report is regenerated -->'


def write_report(
        records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, stem: str = 'ablation', k: float = 2.0,
        header: str = '', png: bool = True,
) -> Dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` (header + tables) and ``<stem>.png`` into ``out_dir``."""
    if not records:
        raise ValueError('no run records to report')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, k)
    paths = dict(csv=out / f'{stem}.csv', md=out / f'{stem}.md')
    write_csv(rows, paths['csv'])
    md = (header.rstrip() + '\n\n' if header else '') + markdown_tables(rows, k)
    if paths['md'].is_file():  # keep the hand-written analysis below the marker
        old = paths['md'].read_text()
        if KEEP_MARKER in old:
            md = md.rstrip() + '\n\n' + KEEP_MARKER + old.split(KEEP_MARKER, 1)[1]
    tmp = paths['md'].with_suffix('.md.tmp')
    tmp.write_text(md)
    os.replace(tmp, paths['md'])
    if png:
        paths['png'] = out / f'{stem}.png'
        plot(rows, paths['png'])
    return paths
