"""Run a study: every (architecture, configuration, seed) through the product's trainer, one record per run.

One run = :func:`timm_dropres.training.trainer.finetune` with the study's ``train:`` options, the
configuration's dropout and the seed (which fixes the initial weights, the data order and the augmentation,
identically for every configuration: dropout has no parameters) -> the weights chosen on validation only (the
last epoch, or the best validation top-1) -> the test split, read once, and the training split in eval mode.
Each finished run writes its record atomically (``<out_dir>/records/<arch>/<config>_seed<seed>.json``) and
deletes its trainer folder, so a killed study loses at most the runs in flight; ``resume=True`` skips every
recorded run, and continues an unfinished one from its last trainer checkpoint.

Runs go side by side in ``workers`` processes (spawned; each with ``threads`` torch threads); on a GPU several
workers share it (each trains on the GPU when there is one, as the trainer does).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..files import read_json, write_json_atomic
from ..models.layers import AFTER_LAST_BN
from ..training.build import build_model, dropout_kwargs, resolve_model
from ..training.checkpoints import list_checkpoints
from ..training.config import FinetuneConfig
from ..training.data import TransformedDataset, resolve_transforms
from ..training.trainer import finetune
from .data import SplitData, resolve_splits, tensor_bundle
from .metrics import ECE_BINS, bn_variance_shift, predict, split_metrics
from .spec import ArchSpec, ConfigSpec, DataSpec, Run, StudySpec, plan_runs, run_fingerprint

__all__ = ['StudyError', 'StudyResult', 'record_path', 'read_records', 'finetune_config', 'run_data', 'run_one',
           'pretrain', 'run_study', 'pending_runs']

_logger = logging.getLogger(__name__)


class StudyError(ValueError):
    """A study that cannot start or continue as asked (records of another spec, records without ``--resume``)."""


@dataclass
class StudyResult:
    """What ``run_study`` did: every record of the study's runs, and which ran now, were skipped or failed."""

    records: List[Dict[str, Any]]
    ran: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)


def record_path(spec: StudySpec, run: Run) -> Path:
    """``<out_dir>/records/<arch>/<config>_seed<seed>.json``."""
    return spec.resolved_out_dir() / 'records' / run.arch.name / f'{run.config.name}_seed{run.seed}.json'


def read_records(spec: StudySpec, runs: Sequence[Run] | None = None) -> Dict[str, Dict[str, Any]]:
    """The records of ``runs`` (default: every planned run) that exist, by run key, fingerprints checked.

    Raises:
        StudyError: a record was written by a different spec (its fingerprint differs).
        ValueError: a record cannot be read.
    """
    out = {}
    for run in runs if runs is not None else plan_runs(spec):
        path = record_path(spec, run)
        if not path.is_file():
            continue
        rec = read_json(path, 'run record')
        want = run_fingerprint(spec, run)
        if rec.get('fingerprint') != want:
            raise StudyError(f'{path} was written by a different study spec (fingerprint {rec.get("fingerprint")} != '
                             f'{want}: the data, training options, architecture or dropout differ); move it away or '
                             'set another out_dir')
        out[run.key] = rec
    return out


def pending_runs(spec: StudySpec, only_arch: Sequence[str] | None = None) -> Tuple[List[Run], List[Run]]:
    """``(to_run, recorded)``: the planned runs without a record, and those with one."""
    runs = plan_runs(spec, only_arch)
    have = read_records(spec, runs)
    return [r for r in runs if r.key not in have], [r for r in runs if r.key in have]


# -- building one run ----------------------------------------------------------------------------------------

def _is_dropres(name: str) -> bool:
    return name.partition('.')[0].endswith('_dropres')


def finetune_config(spec: StudySpec, run: Run, output_dir: Path, pretrained_file: Optional[Path] = None,
                    train: Optional[Dict[str, Any]] = None, data: Optional[DataSpec] = None) -> FinetuneConfig:
    """The trainer options of one run: the study's ``train:``, the architecture, the configuration's dropout, the seed.

    Args:
        spec: the study.
        run: the run.
        output_dir: the trainer's folder.
        pretrained_file: weights of the pretraining stage (replaces ``arch.pretrained``).
        train: trainer options (default ``spec.train``; the pretraining stage passes its own).
        data: the data spec (default ``spec.data``).

    Returns:
        The validated ``FinetuneConfig``.
    """
    arch, c = run.arch, run.config
    data = data or spec.data
    opts = dict(spec.train if train is None else train)
    if data.in_memory:
        opts.setdefault('num_workers', 0)  # tensors in memory: worker processes would only copy them
    model = arch.base_model if c.timm else arch.model
    kw: Dict[str, Any] = dict(model=model, drop_rate=c.drop_rate, model_kwargs=dict(arch.model_kwargs))
    if c.drop_path_rate:
        kw['drop_path_rate'] = c.drop_path_rate
    if _is_dropres(model):
        kw.update(res_drop_rate=c.res_drop_rate, res_drop_pos=c.res_drop_pos)
    elif c.res_drop_rate:
        raise ValueError(f'{run.key}: res_drop_rate needs a *_dropres model, but {model!r} is not one')
    if pretrained_file is not None:
        kw['pretrained_file'] = str(pretrained_file)
    else:
        kw['pretrained'] = arch.pretrained
    return FinetuneConfig(**opts, **kw, dataset=data.dataset, img_size=arch.img_size, seed=run.seed,
                          output_dir=str(output_dir), progress=False)


def check_runs(spec: StudySpec, runs: Sequence[Run]) -> None:
    """Check every (architecture, configuration) of ``runs`` before anything trains or is written.

    Each pair gets the trainer's own checks of its options (``finetune_config``, ``resolve_model``: model name
    and tag, dropres-only options, weights files) and is built on the meta device with its dropout and model
    keywords, which catches what only the model refuses (e.g. ``res_drop_pos='before_last_conv'`` for a family
    whose residual dropout sits after the last BN). Hub and ``local-dir:`` models are checked as far as the
    trainer checks them without downloading.

    Raises:
        StudyError: listing every pair that cannot run, with the reason.
    """
    problems: List[str] = []
    seen = set()
    for run in runs:
        pair = (run.arch.name, run.config.name)
        if pair in seen:
            continue
        seen.add(pair)
        try:
            cfg = finetune_config(spec, run, spec.resolved_work_dir() / run.arch.name / f'{run.config.name}_seed0')
            ref = resolve_model(cfg)
            if ref.architecture is not None and not ref.is_folder:
                timm.create_model(cfg.model, pretrained=False, device='meta', **dropout_kwargs(cfg),
                                  **cfg.model_kwargs)
        except Exception as e:  # noqa: BLE001 - every pair's reason is collected and reported together
            problems.append(f'{run.arch.name} / {run.config.name}: {e}')
    if problems:
        raise StudyError(f'{len(problems)} architecture/configuration pair(s) cannot run, nothing was started: '
                         + '; '.join(problems))


def model_hook(arch: ArchSpec, config: ConfigSpec) -> Callable[[nn.Module], nn.Module]:
    """The changes ``finetune`` applies to the built model: the stem for tiny inputs, and a hook-placed hazard.

    Neither draws random numbers, so the initial weights stay identical across configurations.
    """
    from ..research.ablation import place_after_add, place_before_every_bn, place_head_after_pool, small_input_stem

    def hook(model: nn.Module) -> nn.Module:
        if arch.stem_stride is not None:
            small_input_stem(model, arch.stem_stride)
        if config.hazard == 'before_every_bn':
            place_before_every_bn(model, config.hazard_rate)
        elif config.hazard == 'after_add':
            place_after_add(model, config.hazard_rate)
        elif config.hazard == 'head_after_pool':
            place_head_after_pool(model, config.hazard_rate)
        return model

    return hook


def _resolved_position(model: nn.Module, config: ConfigSpec) -> Optional[str]:
    if not config.res_drop_rate:
        return config.hazard if config.hazard in ('before_every_bn', 'after_add') else None
    from ..research.ablation import resolved_position

    try:
        return resolved_position(model)
    except TypeError:  # not a ResNet-family model: no blocks to ask
        return None
    except AttributeError:  # a family twin's block (models/families.py): its one position is after the last BN
        return AFTER_LAST_BN


# -- data, cached per process ----------------------------------------------------------------------------------

_SPLITS: Dict[str, SplitData] = {}
_TENSORS: Dict[str, Any] = {}


def _key(*parts: Any) -> str:
    return json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)


def _cached(cache: Dict[str, Any], key: str, make: Callable[[], Any]) -> Any:
    """One entry per cache: a worker keeps the data of its current runs, not of every seed's subset."""
    if key not in cache:
        cache.clear()
        cache[key] = make()
    return cache[key]


def _splits(data: DataSpec) -> SplitData:
    return _cached(_SPLITS, _key(data), lambda: resolve_splits(data))


def run_data(data: DataSpec, cfg: FinetuneConfig, arch: ArchSpec) -> Tuple[Any, Any, Any, Dict[str, Any]]:
    """``(bundle for the trainer, test dataset, train dataset for eval, data fingerprint)`` of one run.

    The eval transform is the trainer's (``resolve_transforms`` for the run's model, image size, crop and
    interpolation); the fast path applies it once and keeps the tensors for every run of this process.
    """
    splits = _splits(data)
    probe = timm.create_model(cfg.model, pretrained=False, num_classes=len(splits.label_names),
                              in_chans=splits.in_chans, **cfg.model_kwargs)
    _, eval_tf, data_cfg = resolve_transforms(probe, splits.in_chans, img_size=cfg.img_size, crop_pct=cfg.crop_pct,
                                              interpolation=cfg.interpolation)
    fp = dict(splits.signature, description=splits.description,
              input_size=list(data_cfg['input_size']), mean=list(data_cfg['mean']), std=list(data_cfg['std']))
    if not data.in_memory:
        return (splits.bundle(), TransformedDataset(splits.test, eval_tf), TransformedDataset(splits.train, eval_tf),
                fp)
    k = _key(data, {m: data_cfg.get(m) for m in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation',
                                                 'crop_mode')})
    bundle, test, train_eval, digests = _cached(_TENSORS, k, lambda: tensor_bundle(splits, eval_tf, data_cfg, data))
    return bundle, test, train_eval, dict(fp, tensors=digests)


# -- one run ------------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _train(cfg: FinetuneConfig, bundle: Any, hook: Callable) -> Dict[str, Any]:
    """``finetune`` into ``cfg.output_dir``, continuing from its last checkpoint when a killed run left one."""
    out = Path(cfg.output_dir)
    if out.is_dir() and list_checkpoints(out):
        cfg = dataclasses.replace(cfg, resume=str(out))
    else:
        cfg = dataclasses.replace(cfg, overwrite=True)
    return finetune(cfg, data=bundle, model_hook=hook)


def _trained_model(cfg: FinetuneConfig, folder: Path, num_classes: int, in_chans: int, hook: Callable) -> nn.Module:
    """The run's network rebuilt as trained (stem, hooks) with the exported weights of ``folder``, strictly."""
    plain = dataclasses.replace(cfg, pretrained=False, pretrained_file=None, initial_checkpoint=None)
    model, _ = build_model(plain, resolve_model(plain), num_classes, in_chans)
    model = hook(model)
    model.load_state_dict(load_file(str(folder / 'model.safetensors')), strict=True)
    return model


def run_one(spec: StudySpec, run: Run, *, pretrained_file: Optional[Path] = None,
            log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train one run through the trainer, test it once, write its record atomically and return it.

    Args:
        spec: the study.
        run: the (architecture, configuration, seed).
        pretrained_file: the pretraining stage's weights for this architecture, if the study has one.
        log: called with a one-line summary.

    Returns:
        The record (also at ``record_path(spec, run)``): identity (``study``, ``arch``, ``config``, ``seed``,
        ``fingerprint``, ``model``, ``dropout``, ``resolved_res_pos``), the test metrics (``top1``, ``top5``,
        ``nll``, ``ece``, on ``test_images``), ``train_nll``/``train_top1`` (eval mode, unaugmented training
        images), ``vs_mean``/``vs_max``/``vs_layers`` (the eval-mode BN variance shift on ``vs_images``
        unaugmented training images; None without BN), the final validation metrics (``val``), the per-epoch
        validation ``curve``, which weights were tested (``select``, ``epoch``), ``steps``, ``resumed_at_steps``
        (a killed run continued from its trainer checkpoint; the trainer's resume is exact), the data fingerprint
        (``data``), ``versions``, ``device``, ``wall_s`` and ``cpu_s`` (this process's CPU time).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out = spec.resolved_work_dir() / run.arch.name / f'{run.config.name}_seed{run.seed}'
    cfg = finetune_config(spec, run, out, pretrained_file)
    bundle, test, train_eval, data_fp = run_data(spec.data.for_seed(run.seed), cfg, run.arch)
    hook = model_hook(run.arch, run.config)
    summary = _train(cfg, bundle, hook)
    folder = out / spec.select
    model = _trained_model(cfg, folder, bundle.num_classes, bundle.in_chans, hook)
    device = torch.device('cuda' if torch.cuda.is_available() and not cfg.cpu else 'cpu')
    model.to(device)
    test_m = split_metrics(*predict(model, test, device=device))  # the one read of the test split
    train_m = split_metrics(*predict(model, train_eval, device=device))
    shift = bn_variance_shift(model, train_eval) or dict(vs_mean=None, vs_max=None, vs_layers=None, vs_images=0)
    history = summary.get('history') or []
    epoch = summary['best']['epoch'] if spec.select == 'best' else summary['epochs_completed']
    rec = dict(
        study=spec.name, arch=run.arch.name, config=run.config.name, seed=run.seed,
        fingerprint=run_fingerprint(spec, run), model=cfg.model, dropout=run.config.dropout,
        resolved_res_pos=_resolved_position(model, run.config),
        top1=test_m['top1'], top5=test_m['top5'], nll=test_m['nll'], ece=test_m['ece'], ece_bins=ECE_BINS,
        test_images=test_m['n'], train_nll=train_m['nll'], train_top1=train_m['top1'], train_images=train_m['n'],
        **shift,
        val=dict(top1=history[-1]['top1'], top5=history[-1]['top5'], nll=history[-1]['loss'],
                 images=summary['val_size']) if history else None,
        curve=[dict(epoch=h['epoch'], train_loss=h['train_loss'], val_top1=h['top1'], val_top5=h['top5'],
                    val_nll=h['loss']) for h in history],
        select=spec.select, epoch=epoch, steps=summary['global_steps'],
        resumed_at_steps=[r['step'] for r in summary.get('resumes') or []],
        pretrained_file_sha256=_sha256(pretrained_file) if pretrained_file is not None else None,
        data=data_fp, versions=summary.get('versions'), device=str(device), threads=torch.get_num_threads(),
        machine=platform.machine(), wall_s=round(time.perf_counter() - t0, 2),
        cpu_s=round(time.process_time() - c0, 2))
    write_json_atomic(record_path(spec, run), rec, indent=1, sort_keys=True)
    shutil.rmtree(out, ignore_errors=True)  # its parent stays: parallel workers create runs beside it
    log(f'{run.key:>40}: top-1 {rec["top1"]:6.2f}  NLL {rec["nll"]:.4f}  ECE {rec["ece"]:.4f}  '
        f'({rec["wall_s"]:.0f} s, CPU {rec["cpu_s"]:.0f} s)')
    return rec


def pretrain(spec: StudySpec, arch: ArchSpec, log: Callable[[str], None] = print) -> Path:
    """The pretraining stage of ``arch``: trained once (no dropout) through the same trainer, resumable.

    Returns:
        The weights file (``<work_dir>/pretrained/<arch>.safetensors``); its record, with the file's SHA-256,
        is ``<out_dir>/pretraining/<arch>.json``. An existing file whose hash matches its record is reused.
    """
    pre = spec.pretrain
    assert pre is not None
    weights = spec.resolved_work_dir() / 'pretrained' / f'{arch.name}.safetensors'
    rec_path = spec.resolved_out_dir() / 'pretraining' / f'{arch.name}.json'
    fp = hashlib.sha256(json.dumps(dict(arch={k: v for k, v in dataclasses.asdict(arch).items() if k != 'label'},
                                        pretrain=dataclasses.asdict(pre)), sort_keys=True, default=str
                                   ).encode()).hexdigest()[:16]
    if weights.is_file() and rec_path.is_file():
        rec = read_json(rec_path, 'pretraining record')
        if rec.get('fingerprint') == fp and rec.get('sha256') == _sha256(weights):
            log(f'pretrained {arch.name}: {weights} (recorded)')
            return weights
    t0 = time.perf_counter()
    run = Run(arch, ConfigSpec('pretrain'), pre.seed)
    out = spec.resolved_work_dir() / 'pretrain' / arch.name
    cfg = finetune_config(spec, run, out, train=pre.train, data=pre.data)
    bundle, _, _, data_fp = run_data(pre.data, cfg, arch)
    summary = _train(cfg, bundle, model_hook(arch, run.config))
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix('.tmp')
    shutil.copyfile(out / 'last' / 'model.safetensors', tmp)
    os.replace(tmp, weights)
    last = summary['history'][-1] if summary.get('history') else {}
    write_json_atomic(rec_path, dict(arch=arch.name, model=cfg.model, fingerprint=fp, sha256=_sha256(weights),
                                     classes=bundle.label_names, epochs=summary['epochs_completed'],
                                     steps=summary['global_steps'], val_top1=last.get('top1'), data=data_fp,
                                     versions=summary.get('versions'), wall_s=round(time.perf_counter() - t0, 2)),
                      indent=1, sort_keys=True)
    shutil.rmtree(out, ignore_errors=True)
    log(f'pretrained {arch.name}: validation top-1 {last.get("top1", float("nan")):.2f} -> {weights}')
    return weights


# -- the whole study ---------------------------------------------------------------------------------------------

def _init_worker(threads: Optional[int], parent: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    logging.getLogger('timm_dropres.training').setLevel(logging.WARNING)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel send this worker SIGTERM when the study process (pid ``parent``) dies, even by
    SIGKILL, so no orphaned worker goes on training queued runs (and holding their run folders). Elsewhere a
    no-op."""
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no usable libc: the parent's own shutdown still stops the workers
        return
    if os.getppid() != parent:  # the parent died before the call above (compared by pid: it may be pid 1)
        os.kill(os.getpid(), signal.SIGTERM)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def _worker(spec: StudySpec, run: Run, pretrained_file: Optional[Path]) -> Dict[str, Any]:
    return run_one(spec, run, pretrained_file=pretrained_file, log=lambda m: print(m, flush=True))


def run_study(spec: StudySpec, *, workers: int = 1, resume: bool = False, threads: Optional[int] = None,
              only_arch: Sequence[str] | None = None, log: Callable[[str], None] = print) -> StudyResult:
    """Run every planned run that has no record yet.

    Args:
        spec: the study.
        workers: runs side by side, each in its own spawned process (1: in this process).
        resume: continue a study that already has records (without it, existing records are an error, so a
            study is never extended by accident).
        threads: torch threads per run (None: torch's default).
        only_arch: run only these architectures.
        log: progress lines.

    Returns:
        The records of every planned run that has one, and what ran, was skipped or failed now.

    Raises:
        StudyError: records exist and ``resume`` is off, or a record belongs to another spec.
    """
    if workers < 1:
        raise StudyError(f'--workers must be >= 1, got {workers}')
    todo, done = pending_runs(spec, only_arch)
    if done and not resume:
        raise StudyError(f'{spec.resolved_out_dir() / "records"} already holds {len(done)} of this study\'s records; '
                         'pass --resume to run the rest (finished runs are not re-run)')
    check_runs(spec, todo)
    result = StudyResult([], skipped=[r.key for r in done])
    log(f'study {spec.name}: {len(todo)} runs to go, {len(done)} recorded; {workers} worker(s)')
    weights: Dict[str, Optional[Path]] = {}
    for arch in {r.arch.name: r.arch for r in todo}.values():
        weights[arch.name] = pretrain(spec, arch, log) if spec.pretrain is not None else None
    if threads:
        torch.set_num_threads(threads)
    if workers == 1:
        for run in todo:
            try:
                run_one(spec, run, pretrained_file=weights[run.arch.name], log=log)
                result.ran.append(run.key)
            except Exception as e:  # noqa: BLE001 - one failed run must not stop the others; reported below
                result.failed[run.key] = f'{type(e).__name__}: {e}'
                log(f'{run.key}: FAILED: {type(e).__name__}: {e}')
    else:
        ctx = multiprocessing.get_context('spawn')  # no fork of a process that holds torch threads
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, os.getpid()))
        # SIGTERM stops the study as Ctrl-C does (below) instead of leaving the workers to train the queue
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            futures = {pool.submit(_worker, spec, run, weights[run.arch.name]): run for run in todo}
            for fut in as_completed(futures):
                run = futures[fut]
                try:
                    fut.result()
                    result.ran.append(run.key)
                except Exception as e:  # noqa: BLE001 - as above
                    result.failed[run.key] = f'{type(e).__name__}: {e}'
                    log(f'{run.key}: FAILED: {type(e).__name__}: {e}')
        except BaseException:  # Ctrl-C, SIGTERM: drop the queue and stop the runs in flight, now
            pool.shutdown(wait=False, cancel_futures=True)
            for child in multiprocessing.active_children():
                child.terminate()  # a run in flight keeps its last trainer checkpoint; --resume continues it
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        pool.shutdown()
    result.records = list(read_records(spec, plan_runs(spec, only_arch)).values())
    return result
