"""Fine-tune any timm model (dropres or not) with accelerate: one process to many, resumable, observable.

``finetune(FinetuneConfig(...))`` is the whole trainer; ``dropres-finetune`` and ``scripts/finetune.py`` only parse
flags into the config. What the ecosystem has is used as is: timm builds the model, transforms, Mixup, optimizer,
scheduler and EMA; accelerate handles devices, DDP/FSDP, mixed precision, gradient accumulation, metric gathering,
trackers and the optimizer/scaler/RNG part of checkpoints. Written here: the loop, atomic rotated checkpoint folders,
the resume bookkeeping (epoch, data position, EMA, history; JSON + safetensors, never pickle), and the outputs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import timm
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator, DistributedType
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .. import __version__
from ..files import write_json_atomic, write_text_atomic
from ..models.hf_folder import DATA_CFG_KEYS, save_pretrained_folder
from ..models.reference import ModelRef
from .build import build_model, in_chans_of, model_identity, resolve_model, weights_origin
from .checkpoints import (
    ARGS_FILE,
    CKPT_DIR,
    CKPT_PREFIX,
    EMA_FILE,
    STATE_FILE,
    SUMMARY_CSV,
    CheckpointError,
    _mark_rng,
    _rng_restored,
    find_checkpoint,
    list_checkpoints,
    read_state,
)
from .config import FinetuneConfig, OptionError
from .data import (
    DataBundle,
    DataError,
    EpochSeededDataset,
    TransformedDataset,
    create_mixup,
    data_signature,
    eval_loader,
    iterate,
    resolve_data,
    resolve_transforms,
    train_loader,
)
from .evaluate import EvalResult, evaluate, format_results
from .lock import lock_run_folder
from .logs import main_process_logger
from .progress import _flat_config, _progress, _trackers, _versions, write_history_csv
from .runs import (
    TRACKER_PROJECT,
    RunWriteError,
    TrainingDiverged,
    apply_plan,
    check_resume_data,
    check_resume_settings,
    check_validation_loss,
    first_line,
    model_load_error,
    nonfinite_tensors,
    plan_run,
)

__all__ = ['finetune']

_logger = main_process_logger(__name__)  # logs on the main process only; [RANK i] only when there are several

#: optimizer steps between two reads of the non-finite-loss flag (it is also read before every save)
_FINITE_CHECK_EVERY = 10


class _Trainer:
    """One run's mutable state. Split out of ``finetune`` only to keep each step short to read."""

    def __init__(self, cfg: FinetuneConfig, data: DataBundle | None, ref: ModelRef | None,
                 model_hook: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.cfg = cfg
        self.ref = ref if ref is not None else resolve_model(cfg)  # the model checks, before anything is created
        self.model_hook = model_hook
        self.t_start = time.perf_counter()
        self.out = Path(cfg.output_dir)
        self.resume_ckpt = find_checkpoint(cfg.resume) if cfg.resume else None
        self.resume_state = read_state(self.resume_ckpt) if self.resume_ckpt else None

        log_dir = self.out / 'logs'
        self.acc = Accelerator(
            mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=_trackers(cfg.log_with), project_config=ProjectConfiguration(
                project_dir=str(self.out), logging_dir=str(log_dir), automatic_checkpoint_naming=False),
            step_scheduler_with_optimizer=False)
        # the run folder is this run's alone from here to the end (released by finetune, or below on a refusal)
        self.lock = lock_run_folder(self.out, self.acc)
        try:
            self._plan_and_check(cfg, data)
        except BaseException:
            self.lock.release()
            raise

    def _plan_and_check(self, cfg: FinetuneConfig, data: DataBundle | None) -> None:
        """Decide what happens to the run folder, check the resume settings and the data (nothing is written)."""
        # what happens to --output-dir is decided here and carried out only once everything is validated
        self.plan = plan_run(self.out, self.resume_ckpt, cfg.overwrite, probe=self.acc.is_main_process)
        self.resumes: List[Dict[str, Any]] = list(self.resume_state.get('resumes') or []) if self.resume_state else []
        changed = {}
        if self.resume_state is not None:
            changed = check_resume_settings(self.resume_state.get('config'), cfg, self.resume_ckpt,
                                            int(self.resume_state['epoch']))
        set_seed(cfg.seed)
        self.data = data if data is not None else resolve_data(
            cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, val_fraction=cfg.val_fraction,
            train_subset=cfg.train_subset, val_subset=cfg.val_subset, seed=cfg.seed)
        if self.data.train is None:
            raise ValueError(f'{self.data.description} has no training split')
        self._check_data()
        self.data_signature = data_signature(self.data)
        if self.resume_state is not None:
            check_resume_data(self.resume_state.get('data'), self.data_signature, self.resume_ckpt)
            self.resumes.append(dict(checkpoint=str(self.resume_ckpt), step=int(self.resume_state['global_step']),
                                     action=self.plan.action, changed=changed))

    # -- setup ---------------------------------------------------------------------------------

    def _check_data(self) -> None:
        """Refuse data a classifier cannot be trained on, before anything is built or written."""
        data, cfg = self.data, self.cfg
        if data.num_classes < 2:
            raise DataError(f'{data.description} has {data.num_classes} class ({data.label_names}); a classifier '
                            'needs at least 2 classes')
        global_batch = cfg.batch_size * self.acc.num_processes
        if len(data.train) < global_batch:
            raise OptionError('the training set has {n} images, fewer than one global batch ({0} {bs} x {procs} '
                              'processes); lower {0} to at most {most}', 'batch_size', n=len(data.train),
                              bs=cfg.batch_size, procs=self.acc.num_processes,
                              most=len(data.train) // self.acc.num_processes)

    def setup(self) -> None:
        cfg, acc, data = self.cfg, self.acc, self.data
        try:
            model, self.model_kwargs = build_model(cfg, self.ref, data.num_classes, data.in_chans)
        except (RuntimeError, pickle.UnpicklingError, SafetensorError) as e:  # refused, damaged or not fitting
            raise model_load_error(cfg.model, e, cfg.pretrained_file) from e
        if self.model_hook is not None:  # e.g. a study's hook-placed dropout; it must not consume the RNG
            model = self.model_hook(model)
        if in_chans_of(model) != data.in_chans:
            raise ValueError(f'{cfg.model} takes {in_chans_of(model)}-channel input; the data has {data.in_chans}')
        self.identity = model_identity(model, self.ref, data.num_classes, data.in_chans)
        self.origin = weights_origin(model, cfg, self.ref)
        if self.resume_state is not None:
            self._check_resume_identity()
        train_tf, eval_tf, self.data_cfg = resolve_transforms(
            model, data.in_chans, img_size=cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
            auto_augment=cfg.aa, hflip=cfg.hflip, color_jitter=cfg.color_jitter, re_prob=cfg.reprob,
            scale=cfg.scale, ratio=cfg.ratio, pad_crop=cfg.pad_crop)
        if data.preprocessed:  # tensors already at model resolution; only tensor augmentation may remain
            train_tf, eval_tf = data.train_transform, None
        if cfg.sync_bn and acc.num_processes > 1 and acc.device.type != 'cuda':
            raise OptionError('{0} needs CUDA devices (torch.nn.SyncBatchNorm); this run is on {device}', 'sync_bn',
                              device=acc.device.type)
        if cfg.sync_bn and acc.num_processes > 1:
            # BN statistics are per process under DDP; SyncBN averages them over all processes, which
            # matters when the per-process batch is small. timm's converter also handles BatchNormAct2d.
            model = timm.layers.convert_sync_batchnorm(model)
            _logger.info('BatchNorm converted to SyncBatchNorm across %d processes', acc.num_processes)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)

        self.mixup = create_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, data.num_classes)
        self.train_ds = EpochSeededDataset(data.train, train_tf, seed=cfg.seed)
        # drop_last as timm's loaders do: equal batches (Mixup needs even ones; BN hates a batch of 1)
        tl, self.sampler = train_loader(self.train_ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers,
                                        drop_last=True, pin_memory=torch.cuda.is_available() and not cfg.cpu)
        vl = eval_loader(TransformedDataset(data.val, eval_tf), cfg.eval_batch_size or 2 * cfg.batch_size,
                         num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available() and not cfg.cpu)

        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        momentum=cfg.momentum, layer_decay=cfg.layer_decay)
        model, optimizer, self.train_loader, self.val_loader = acc.prepare(model, optimizer, tl, vl)
        self.model, self.optimizer = model, optimizer
        # what runs forward: the prepared model, or (--torchcompile) a compiled view of it. Checkpoints,
        # exports and EMA keep using self.model, so their keys never carry torch.compile's prefix.
        self.forward_model = torch.compile(model, backend=cfg.torchcompile) if cfg.torchcompile else model
        self.updates_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        # stepped per update (step_on_epochs=False) from the global step, so resume needs no scheduler state
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, decay_milestones=list(cfg.decay_milestones),
            decay_rate=cfg.decay_rate, step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)
        self.ema = None
        if cfg.ema:
            if acc.distributed_type == DistributedType.FSDP:
                raise OptionError('{0} is not supported with FSDP (ModelEmaV3 needs unsharded weights)', 'ema')
            self.ema = ModelEmaV3(acc.unwrap_model(model), decay=cfg.ema_decay)
        if self.mixup is not None:  # mixup's soft targets carry the smoothing
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:  # torch's fused label smoothing: the same loss as timm's LabelSmoothingCrossEntropy, one kernel
            self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)

        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self._resumed_loss: Tuple[float, int] = (0.0, 0)
        self.best: Dict[str, Any] | None = None
        self.history: List[Dict[str, Any]] = []
        self.train_time, self.train_images = 0.0, 0
        # the first optimizer step whose loss was not finite (-1: none); kept on the device, read when checked
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=acc.device)
        if self.resume_ckpt is not None:
            self._load_checkpoint(self.resume_ckpt)
        # everything is validated and loaded: only now touch the output folder
        if acc.is_main_process:
            apply_plan(self.plan)
        acc.wait_for_everyone()
        if cfg.log_with:
            acc.init_trackers(TRACKER_PROJECT, config=_flat_config(cfg))
        if acc.is_main_process:  # the resolved options, as timm train.py writes them (a resumed run rewrites it)
            write_text_atomic(self.out / ARGS_FILE, yaml.safe_dump(asdict(cfg), sort_keys=False))

    def _check_resume_identity(self) -> None:
        saved = self.resume_state.get('identity', {})
        diffs = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
        if diffs:
            detail = '; '.join(f'{k}: checkpoint {a!r} vs this run {b!r}' for k, (a, b) in diffs.items())
            raise CheckpointError('{0} {ckpt} is from a different model or dataset ({detail})', 'resume',
                                  ckpt=self.resume_ckpt, detail=detail)

    # -- checkpointing -------------------------------------------------------------------------

    def _state_dict(self, epoch_loss: Tuple[float, int]) -> Dict[str, Any]:
        return dict(epoch=self.epoch, batches_done=self.batches_done, global_step=self.global_step,
                    epoch_loss_sum=epoch_loss[0], epoch_loss_batches=epoch_loss[1],
                    best=self.best, history=self.history, train_time_s=self.train_time,
                    train_images=self.train_images, num_processes=self.acc.num_processes,
                    identity=self.identity, model=self.cfg.model, label_names=self.data.label_names,
                    config=asdict(self.cfg), timm_dropres_version=__version__, data=self.data_signature,
                    resumes=self.resumes)

    def _check_finite(self, weights: bool = True) -> None:
        """Stop a diverged run before anything from it is checkpointed, evaluated or exported.

        Collective: every process calls it at the same point of the loop.

        Args:
            weights: also check every weight and buffer (and the EMA's), not only the losses seen so far.

        Raises:
            TrainingDiverged: a loss since the start (or the resume) or a weight is NaN or infinite.
        """
        acc = self.acc
        bad_weights: List[str] = []
        if weights:
            bad_weights = nonfinite_tensors(acc.unwrap_model(self.model))
            if self.ema is not None:
                bad_weights += [f'ema.{n}' for n in nonfinite_tensors(self.ema.module)]
        flags = torch.stack([self._first_bad_step, torch.tensor(len(bad_weights), device=acc.device)])
        flags = acc.gather(flags.reshape(1, 2))
        steps = [int(s) for s in flags[:, 0].tolist() if s >= 0]
        if not steps and int(flags[:, 1].max()) == 0:
            return
        if steps:
            what = f'the training loss is NaN or infinite from step {min(steps)}'
        else:
            where = bad_weights[:3] or 'on another process'
            what = f'weights are NaN or infinite after step {self.global_step} ({where})'
        ckpts = list_checkpoints(self.out)
        kept = (f'the last good checkpoint is {ckpts[-1]}' if ckpts else 'no checkpoint had been written yet')
        if self.best is not None:
            kept += f'; best/ holds epoch {self.best["epoch"]} (top-1 {self.best["top1"]:.2f})'
        raise TrainingDiverged(
            'training diverged: {what} (epoch {epoch}). Stopped without checkpointing or exporting anything from that '
            'point; {kept}. Lower {0}, or add {1} or a longer {2}', 'lr', 'clip_grad', 'warmup_epochs', what=what,
            epoch=self.epoch + 1, kept=kept)

    def save_checkpoint(self) -> Path:
        """accelerate's state (model, optimizer, scaler, per-process RNG) + ours, as one atomic folder."""
        acc = self.acc
        ckpt_root = self.out / CKPT_DIR
        final = ckpt_root / f'{CKPT_PREFIX}{self.global_step:09d}'
        tmp = ckpt_root / f'.tmp-{final.name}'
        self._check_finite()  # a diverged run keeps its last good checkpoint
        epoch_loss = (0.0, 0)
        if self.batches_done:  # mid-epoch: keep the running loss so the resumed epoch reports the same mean
            epoch_loss = (acc.reduce(self._loss_sum.clone(), reduction='mean').item(), self._loss_batches)
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                if self.ema is not None:
                    save_file({k: v.contiguous() for k, v in self.ema.module.state_dict().items()},
                              str(tmp / EMA_FILE))
                write_json_atomic(tmp / STATE_FILE, self._state_dict(epoch_loss))
                if final.exists():  # same step saved twice (e.g. epoch end == step checkpoint)
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, a vanished mount: torch says
            # it with a RuntimeError (PytorchStreamWriter), safetensors with SafetensorError; earlier checkpoints stay
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            raise RunWriteError('cannot write checkpoint {final}: {why}; the earlier checkpoints are intact ({0} {out} '
                                'continues from the latest)', 'resume', final=final, why=why, out=self.out) from e
        except BaseException:  # Ctrl-C (KeyboardInterrupt) mid-write: no half checkpoint stays behind
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if acc.is_main_process:
            for old in list_checkpoints(self.out)[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, ckpt: Path) -> None:
        state = self.resume_state
        acc = self.acc
        saved_procs = state.get('num_processes', 1)
        if saved_procs != acc.num_processes and state.get('batches_done', 0) > 0:
            raise CheckpointError(
                f'{ckpt} was written mid-epoch by {saved_procs} processes; resume it with the same number of '
                f'processes (this run has {acc.num_processes}), or from an epoch-end checkpoint')
        rng_file = ckpt / f'random_states_{acc.process_index}.pkl'
        same_procs = saved_procs == acc.num_processes
        if same_procs and not rng_file.is_file():
            # accelerate would log and carry on with fresh RNG, silently breaking exact resume
            raise CheckpointError.corrupt(ckpt, f'{rng_file.name} is missing')
        # accelerate logs (at INFO) and carries on when the RNG file cannot be loaded; a random marker state set
        # just before tells whether it really restored all generators
        marker = _mark_rng() if same_procs else None
        try:
            acc.load_state(str(ckpt))
        except Exception as e:  # safetensors/torch raise many types for truncated or garbled files
            raise CheckpointError.corrupt(ckpt, f'it cannot be loaded ({first_line(e)})') from e
        if marker is not None:
            restored = acc.gather(torch.tensor([float(_rng_restored(marker))], device=acc.device))
            if float(restored.min()) < 1:
                raise CheckpointError.corrupt(
                    ckpt, f'random_states_<process>.pkl ({rng_file.name} on process {acc.process_index}, or another '
                    'process\'s) cannot be loaded, so the random number generators would not continue exactly')
        if self.ema is not None:
            ema_file = ckpt / EMA_FILE
            if not ema_file.is_file():
                raise CheckpointError.corrupt(ckpt, f'{{2}} is on but it has no {EMA_FILE}', 'ema')
            try:
                self.ema.module.load_state_dict(load_file(str(ema_file), device=str(acc.device)))
            except Exception as e:  # SafetensorError, RuntimeError (shapes, missing keys)
                raise CheckpointError.corrupt(ckpt, f'{EMA_FILE} cannot be loaded ({first_line(e)})') from e
        self.epoch, self.batches_done = int(state['epoch']), int(state['batches_done'])
        self.global_step = int(state['global_step'])
        self._resumed_loss = (float(state.get('epoch_loss_sum', 0.0)), int(state.get('epoch_loss_batches', 0)))
        self.best, self.history = state.get('best'), list(state.get('history', []))
        self.train_time, self.train_images = float(state.get('train_time_s', 0)), int(state.get('train_images', 0))
        _logger.info('Resumed from %s: epoch %d, batch %d, step %d', ckpt, self.epoch, self.batches_done,
                     self.global_step)

    # -- outputs -------------------------------------------------------------------------------

    def export(self, name: str, model: nn.Module, metrics: Dict[str, Any], source: str) -> None:
        """Write ``<output_dir>/<name>/`` in the Hugging Face folder format (main process only)."""
        acc = self.acc
        if acc.distributed_type == DistributedType.FSDP and model is self.model:
            state = acc.get_state_dict(model)  # collective: gathers the full weights on the main process
            if not acc.is_main_process:
                return
            model = timm.create_model(self.ref.create_name(pretrained=False), pretrained=False, **self.model_kwargs)
            if self.model_hook is not None:  # the trained network, as setup() built it
                model = self.model_hook(model)
            model.load_state_dict(state)
        elif model is self.model:
            model = acc.unwrap_model(model)
        if not acc.is_main_process:
            return
        # config.json describes these weights: the preprocessing they were trained and evaluated with,
        # and where they started from only when they started from weights (see models.hf_folder)
        data_cfg = {k: self.data_cfg[k] for k in DATA_CFG_KEYS if self.data_cfg.get(k) is not None}
        extra = dict(metrics=metrics, weights=source, dataset=self.cfg.dataset or self.data.description)
        if self.origin is not None:
            extra['finetuned_from'] = self.origin['finetuned_from']
        try:  # written beside and renamed: a failed write leaves the previous folder (or none) in place
            save_pretrained_folder(model, self.out / name, label_names=self.data.label_names, data_config=data_cfg,
                                   license=self.origin['license'] if self.origin else None, extra_config=extra)
        except (OSError, RuntimeError, SafetensorError) as e:  # disk full: SafetensorError from safetensors
            why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
            raise RunWriteError('cannot write {folder}: {why}; the checkpoints are intact ({0} {out} continues from '
                                'the latest)', 'resume', folder=self.out / name, why=why, out=self.out) from e

    # -- loop ----------------------------------------------------------------------------------

    def evaluate(self) -> Tuple[EvalResult, EvalResult | None]:
        res = evaluate(self.forward_model, self.val_loader, accelerator=self.acc, label_names=self.data.label_names)
        ema_res = None
        if self.ema is not None:
            ema_res = evaluate(self.ema.module, self.val_loader, accelerator=self.acc,
                               label_names=self.data.label_names)
        if res.num_samples != len(self.data.val):  # every validation image counts exactly once
            raise DataError(f'validation counted {res.num_samples} images, but the split has {len(self.data.val)}')
        return res, ema_res

    def train_epoch(self) -> Tuple[float, bool]:
        """One epoch (or its remainder after a resume); returns (mean train loss, stopped early)."""
        cfg, acc = self.cfg, self.acc
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        self.train_ds.set_epoch(self.epoch)
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        if self.batches_done:
            loader = acc.skip_first_batches(self.train_loader, self.batches_done)
            loader.set_epoch(self.epoch)
        total = len(self.train_loader)
        # running loss of this epoch; a resumed epoch starts from the checkpoint's (process-averaged) sum
        self._loss_sum = torch.full((), self._resumed_loss[0] if self.batches_done else 0.0, device=acc.device)
        self._loss_batches = self._resumed_loss[1] if self.batches_done else 0
        bar = _progress(cfg, acc, total, self.batches_done, f'epoch {self.epoch + 1}/{cfg.epochs}')
        t0 = time.perf_counter()
        ckpt_time = 0.0
        imgs = 0
        stopped = False
        for images, targets in iterate(loader):  # a Ctrl-C while its workers fork is not lost
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with acc.accumulate(self.model):
                if self.mixup is not None:
                    images, targets = self.mixup(images, targets)
                output = self.forward_model(images)
                loss = self.criterion(output, targets)
                acc.backward(loss)
                if acc.sync_gradients and cfg.clip_grad:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.batches_done += 1
            self._loss_batches += 1
            self._loss_sum += loss.detach()
            self._first_bad_step = torch.where(  # no host sync: read every few steps and before any save
                (self._first_bad_step < 0) & ~torch.isfinite(loss.detach()), self.global_step + 1,
                self._first_bad_step)
            imgs += images.shape[0] * acc.num_processes
            if bar is not None:
                bar.update(1)
            if not acc.sync_gradients:
                continue
            self.global_step += 1
            if self.global_step % _FINITE_CHECK_EVERY == 0:
                self._check_finite(weights=False)
            self.scheduler.step_update(num_updates=self.global_step)
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.model), step=self.global_step)
            if bar is not None and (self.global_step % 10 == 0 or self.batches_done >= total):  # .item() syncs
                elapsed = time.perf_counter() - t0 - ckpt_time
                bar.set_postfix(loss=f'{loss.item():.3f}', img_s=f'{imgs / max(elapsed, 1e-9):.0f}',
                                lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}')
            if cfg.log_with and cfg.log_every and self.global_step % cfg.log_every == 0:
                acc.log({'train/loss': loss.item(), 'train/lr': self.optimizer.param_groups[0]['lr']},
                        step=self.global_step)
            stop = cfg.stop_after_steps is not None and self.global_step >= cfg.stop_after_steps
            at_end = self.batches_done >= total
            if not at_end and (stop or (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0)):
                t_ck = time.perf_counter()
                self.save_checkpoint()
                ckpt_time += time.perf_counter() - t_ck
            if stop and not at_end:
                stopped = True
                break
        if bar is not None:
            bar.close()
        self.train_time += time.perf_counter() - t0 - ckpt_time
        self.train_images += imgs
        mean_loss = acc.reduce(self._loss_sum, reduction='mean').item() / max(self._loss_batches, 1)
        return mean_loss, stopped

    def run(self) -> Dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        _logger.info('Fine-tuning %s on %s: %d train / %d val images, %d classes, %d channel(s), input %s; '
                     '%d process(es) on %s, mixed precision %s', cfg.model, self.data.description,
                     len(self.data.train), len(self.data.val), self.data.num_classes, self.data.in_chans,
                     tuple(self.data_cfg['input_size']), acc.num_processes, acc.device, acc.mixed_precision)
        stopped = False
        last_res: EvalResult | None = None
        last_ema: EvalResult | None = None
        while self.epoch < cfg.epochs:
            train_loss, stopped = self.train_epoch()
            if stopped:
                break
            self._check_finite()  # nothing non-finite is evaluated, exported or checkpointed
            t_eval = time.perf_counter()
            last_res, last_ema = self.evaluate()
            check_validation_loss(last_res.loss, self.data.num_classes, self.epoch + 1, self.out,
                                  self.history[-1]['step'] if self.history else 0, self.best)
            eval_time = time.perf_counter() - t_eval
            row = dict(epoch=self.epoch + 1, step=self.global_step, train_loss=train_loss,
                       lr=self.optimizer.param_groups[0]['lr'], top1=last_res.top1, top5=last_res.top5,
                       loss=last_res.loss, eval_time_s=eval_time)
            if last_ema is not None:
                row.update(ema_top1=last_ema.top1, ema_top5=last_ema.top5, ema_loss=last_ema.loss)
            self.history.append(row)
            candidates = [('model', last_res)] + ([('ema', last_ema)] if last_ema is not None else [])
            source, res = max(candidates, key=lambda c: c[1].top1)
            if self.best is None or res.top1 > self.best['top1']:
                self.best = dict(epoch=self.epoch + 1, top1=res.top1, top5=res.top5, loss=res.loss, weights=source)
                self.export('best', self.model if source == 'model' else self.ema.module,
                            dict(top1=res.top1, top5=res.top5, loss=res.loss, epoch=self.epoch + 1), source)
            msg = (f'epoch {self.epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f}  val top-1 '
                   f'{last_res.top1:.2f}  top-5 {last_res.top5:.2f}  loss {last_res.loss:.4f}')
            if last_ema is not None:
                msg += f'  | EMA top-1 {last_ema.top1:.2f}'
            _logger.info(msg)
            if cfg.log_with:
                acc.log({f'val/{k}': v for k, v in row.items() if k not in ('epoch', 'step')}, step=self.global_step)
            if acc.is_main_process:
                write_history_csv(self.out / SUMMARY_CSV, self.history)
            self.epoch += 1
            self.batches_done = 0
            self.save_checkpoint()
            if cfg.stop_after_steps is not None and self.global_step >= cfg.stop_after_steps \
                    and self.epoch < cfg.epochs:
                stopped = True
                break

        if not stopped and last_res is None:  # resumed a finished run: evaluate what we have
            last_res, last_ema = self.evaluate()
        if not stopped:
            self.export('last', self.model, dict(top1=last_res.top1, top5=last_res.top5, loss=last_res.loss,
                                                 epoch=self.epoch), 'model')
        summary = self._summary(last_res, last_ema, stopped)
        if acc.is_main_process:
            write_json_atomic(self.out / 'summary.json', summary)
        if last_res is not None:
            _logger.info('\n%s', format_results(last_res, 'Final validation (last weights):'))
        if cfg.log_with:
            acc.end_training()
        acc.wait_for_everyone()
        return summary

    def _summary(self, last: EvalResult | None, last_ema: EvalResult | None, stopped: bool) -> Dict[str, Any]:
        acc = self.acc
        return dict(
            model=self.cfg.model, dataset=self.cfg.dataset, data=self.data.description,
            num_classes=self.data.num_classes, label_names=self.data.label_names, in_chans=self.data.in_chans,
            input_size=list(self.data_cfg['input_size']), train_size=len(self.data.train),
            val_size=len(self.data.val), epochs_completed=self.epoch, global_steps=self.global_step,
            interrupted=stopped, best=self.best,
            last=last.to_dict() if last is not None else None,
            last_ema=last_ema.to_dict() if last_ema is not None else None,
            history=self.history,
            throughput=dict(train_img_per_s=self.train_images / self.train_time if self.train_time else None,
                            train_images=self.train_images, train_time_s=self.train_time),
            wall_time_s=time.perf_counter() - self.t_start,
            num_processes=acc.num_processes, device=str(acc.device), distributed_type=str(acc.distributed_type),
            mixed_precision=acc.mixed_precision, model_kwargs=self.model_kwargs, resumes=self.resumes,
            dropout_args=self.identity['dropout_args'], output_dir=str(self.out),
            config=asdict(self.cfg), versions=_versions(),
        )



def finetune(cfg: FinetuneConfig, data: DataBundle | None = None, *, ref: ModelRef | None = None,
             model_hook: Callable[[nn.Module], nn.Module] | None = None) -> Dict[str, Any]:
    """Run a fine-tuning job and return its summary (also written to ``<output_dir>/summary.json``).

    Call under ``accelerate launch`` for several processes; every process must call it with the same config.

    Args:
        cfg: the run's options.
        data: the data, already resolved (benchmarks, in-memory tensors); None: ``cfg.dataset`` is resolved by
            :func:`timm_dropres.training.data.resolve_data`.
        ref: ``cfg.model`` as :func:`~timm_dropres.training.build.resolve_model` returned it, when the caller
            has checked it already (the CLI); None: it is resolved here, before anything is created.
        model_hook: called with the built model before anything else sees it; returns the model to train
            (:mod:`timm_dropres.study` adds its hook-placed dropout and stem changes with it).

    Returns:
        The run's summary: final and best metrics, the history, where the weights went, the versions.
    """
    trainer = _Trainer(dataclasses.replace(cfg), data, ref, model_hook)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.lock.release()
