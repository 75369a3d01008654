"""Running the ablation: one run (train, evaluate, measure), the resumable loop over runs, and its records.

The training loop here is the ablation's own in-memory loop; it is kept apart from the configurations,
the specification and the report so that it can be replaced on its own.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ...files import read_json, write_json_atomic
from ...models.layers import AFTER_LAST_BN, AUTO, BEFORE_LAST_CONV
from ...training.evaluate import evaluate
from ..analysis import shift_max, shift_mean, variance_shift
from .configs import AblationConfig, config_rates, get_config
from .data import AblationData, _augment
from .placement import build_model, configs_for, resolved_position
from .spec import AblationSpec, ArchSpec

# ----------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------

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
