"""Run folders: where a run may write, whether a checkpoint may be resumed with these settings, and when to stop.

Three guarantees of the trainer live here, each checked before anything is written:

* **Never lose a run.** :func:`plan_run` resolves ``--output-dir``, ``--resume`` and ``--overwrite`` into one
  :class:`RunPlan`, or refuses. ``--overwrite`` removes only what a run writes (:data:`OUTPUT_ARTIFACTS` with
  the contents a run gives them) and refuses a folder that holds anything else.
* **Never mix two runs.** A resumed run continues in its own folder, or in a new or cleared one; never next
  to another run's checkpoints. :data:`RESUME_RULES` says for every option whether a resumed run must keep
  the checkpoint's value (exact resume), may change it (recorded in ``summary.json``), or is free to.
* **Never report a wrong number without saying so.** :class:`TrainingDiverged` stops a run whose loss or
  weights stop being finite, before they are checkpointed or exported.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from ..errors import OptionError, OptionMessage
from ..files import TEMP_MARKER, replaced_name
from ..models.hf_folder import CONFIG_NAME, WEIGHTS_NAME
from .checkpoints import CKPT_DIR, CKPT_PREFIX, OUTPUT_ARTIFACTS, RUN_LOCK, CheckpointError, list_checkpoints

if TYPE_CHECKING:
    from .config import FinetuneConfig

__all__ = ['TRACKER_PROJECT', 'SAME', 'RECORDED', 'FREE', 'RESUME_RULES', 'OutputDirError', 'RunWriteError',
           'TrainingDiverged',
           'RunPlan', 'plan_run', 'apply_plan', 'clean_partial_writes', 'check_resume_settings',
           'check_resume_data', 'nonfinite_tensors', 'check_validation_loss', 'EXPLODED_LOSS_FACTOR', 'error_line',
           'first_line', 'model_load_error']

_logger = logging.getLogger(__name__)

#: accelerate's tracker project name: tensorboard writes under ``logs/<TRACKER_PROJECT>/``.
TRACKER_PROJECT = 'dropres-finetune'
_EXPORTS = ('best', 'last')
_CKPT_NAME = re.compile(rf'(\.tmp-)?{CKPT_PREFIX}\d+')
#: what an interrupted atomic write of an artifact leaves (files.TEMP_MARKER), and an export caught between its
#: two renames (files.replaced_name): exact names, never a user's ``.best.backup`` or ``.summary.csv.swp``
_TEMP_NAME = re.compile(rf'\.({"|".join(map(re.escape, OUTPUT_ARTIFACTS))})\.{TEMP_MARKER}-[0-9a-f]+')
_REPLACED = tuple(replaced_name(e).name for e in _EXPORTS)


def _interrupted_write(name: str) -> bool:
    """True for the exact names an interrupted atomic write of the trainer leaves in a run folder."""
    return bool(_TEMP_NAME.fullmatch(name)) or name in _REPLACED

#: resume rule: the resumed run must use the checkpoint's value (else it would not be an exact continuation).
SAME = 'same'
#: resume rule: may differ; the change is recorded in ``summary.json`` (``resumes``).
RECORDED = 'recorded'
#: resume rule: may differ; it does not change what is computed (runtime and bookkeeping options).
FREE = 'free'

#: For every option of :class:`~timm_dropres.training.config.FinetuneConfig`: what a resumed run may change.
#: Options not listed are treated as :data:`SAME`. docs/training.md has this table with the reasons.
RESUME_RULES: Dict[str, str] = {
    # model: the weights come from the checkpoint, but the network must be the one that was trained
    'model': SAME, 'pretrained': SAME, 'pretrained_file': RECORDED, 'drop_rate': SAME, 'res_drop_rate': SAME,
    'res_drop_pos': SAME, 'model_kwargs': SAME, 'sync_bn': SAME, 'channels_last': RECORDED,
    'drop_path_rate': SAME, 'drop_block_rate': SAME,
    # the starting weights are replaced by the checkpoint's; compiling and recomputing change only speed
    'initial_checkpoint': RECORDED, 'torchcompile': RECORDED, 'grad_checkpointing': RECORDED,
    # data: the path may move (the images themselves are compared), the selection and transforms may not
    'dataset': RECORDED, 'data_dir': RECORDED, 'download': FREE, 'val_fraction': SAME, 'train_subset': SAME,
    'val_subset': SAME, 'img_size': SAME, 'crop_pct': SAME, 'interpolation': SAME,
    # augmentation, loss, optimisation: every one changes the numbers from the checkpoint on
    'aa': SAME, 'hflip': SAME, 'color_jitter': SAME, 'reprob': SAME, 'scale': SAME, 'ratio': SAME, 'pad_crop': SAME,
    'mixup': SAME, 'cutmix': SAME, 'smoothing': SAME, 'opt': SAME, 'lr': SAME, 'weight_decay': SAME,
    'momentum': SAME, 'layer_decay': SAME, 'clip_grad': SAME, 'sched': SAME, 'decay_milestones': SAME,
    'decay_rate': SAME, 'warmup_epochs': SAME, 'warmup_lr': SAME, 'min_lr': SAME, 'batch_size': SAME,
    'grad_accum_steps': SAME, 'mixed_precision': SAME, 'ema': SAME, 'ema_decay': SAME, 'seed': SAME,
    # a longer (or equal) run: the schedule is recomputed for the new length
    'epochs': RECORDED,
    # where and how it runs
    'eval_batch_size': RECORDED, 'cpu': RECORDED, 'num_workers': FREE, 'output_dir': FREE, 'overwrite': FREE,
    'resume': FREE, 'checkpoint_every': FREE, 'keep_checkpoints': FREE, 'stop_after_steps': FREE,
    'log_with': FREE, 'log_every': FREE, 'progress': FREE,
}


class OutputDirError(OptionMessage, OSError):
    """``output_dir`` cannot be used as asked: a file, another run, files a run did not write, or unwritable.

    The message names options by their field names (:class:`~timm_dropres.errors.OptionMessage`).
    """


class RunWriteError(OptionMessage, OSError):
    """A write into the run folder failed (disk full, quota, a vanished mount); the earlier checkpoints are intact.

    The message names options by their field names (:class:`~timm_dropres.errors.OptionMessage`).
    """


class TrainingDiverged(OptionMessage, RuntimeError):
    """The loss or the weights stopped being finite; nothing from that point on was saved.

    The message names options by their field names (:class:`~timm_dropres.errors.OptionMessage`).
    """


# ----------------------------------------------------------------------------------------------
# the output folder


def _foreign_inside(entry: Path) -> List[str]:
    """What, inside one top-level entry of a run folder, a run did not write (``[entry]`` when all of it)."""
    name = entry.name
    if entry.is_symlink():
        return [name]
    if _interrupted_write(name):  # a temporary or replaced copy of an artifact (an interrupted atomic write)
        return []
    if name not in OUTPUT_ARTIFACTS:
        return [name]
    if name == CKPT_DIR:
        if not entry.is_dir():
            return [name]
        return [f'{name}/{p.name}' for p in entry.iterdir() if not (p.is_dir() and _CKPT_NAME.fullmatch(p.name))]
    if name in _EXPORTS:
        if not entry.is_dir():
            return [name]
        return [f'{name}/{p.name}' for p in entry.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME)]
    if name == 'logs':
        if not entry.is_dir():
            return [name]
        return [f'{name}/{p.name}' for p in entry.iterdir() if p.name != TRACKER_PROJECT]
    return [] if entry.is_file() else [name]  # summary.json and the other file artifacts


def _same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _run_dir_of(ckpt: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/step_N``), or None for a standalone one."""
    return ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else None


def _check_writable(out: Path, probe: bool) -> None:
    """Fail now, with the path, when ``out`` cannot be created or written (read-only, no permission, a file).

    Args:
        out: the output folder (it need not exist).
        probe: also create and remove a hidden folder in it (or in its nearest existing parent): ``os.access``
            says yes to root on a read-only mount. Only the main process probes; the others only read.
    """
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise OutputDirError('{0} {out}: {base} is a file, not a folder', 'output_dir', out=out, base=base)
    try:
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        if probe:
            os.rmdir(tempfile.mkdtemp(prefix='.dropres-write-test-', dir=base))
    except OSError as e:
        raise OutputDirError('{0} {out} cannot be written ({base}: {why})', 'output_dir', out=out, base=base,
                             why=e.strerror or e) from None


@dataclass(frozen=True)
class RunPlan:
    """What a run will do with its output folder, decided before anything is written.

    Attributes:
        output_dir: the run folder.
        action: ``'new'`` (empty or missing folder), ``'overwrite'`` (a previous run's outputs are removed first),
            ``'continue'`` (resume in the checkpoint's own run folder) or ``'fork'`` (resume into another folder,
            new or cleared).
        resume_ckpt: the checkpoint to resume, if any.
        remove: the previous run's outputs that are removed before the run starts.
    """

    output_dir: Path
    action: str
    resume_ckpt: Path | None = None
    remove: Tuple[Path, ...] = ()

    def describe(self) -> str:
        """One line for the log.

        Returns:
            What the plan does to the output folder, and from which checkpoint it resumes.
        """
        what = {'new': 'new run', 'overwrite': 'new run, replacing the previous run\'s outputs',
                'continue': 'continuing the run', 'fork': 'continuing into a new folder'}[self.action]
        src = f' from {self.resume_ckpt}' if self.resume_ckpt is not None else ''
        return f'{self.output_dir}: {what}{src}'


def plan_run(output_dir: str | os.PathLike, resume_ckpt: Path | None, overwrite: bool, *,
             probe: bool = True) -> RunPlan:
    """Resolve ``--output-dir``, ``--resume`` and ``--overwrite`` into one unambiguous plan, or refuse.

    Args:
        output_dir: ``--output-dir``.
        resume_ckpt: the checkpoint ``--resume`` names (already resolved), or None.
        overwrite: ``--overwrite``.
        probe: check writability by creating (and removing) a hidden folder; False on processes other than the
            main one, which never write into the run folder.

    Returns:
        The plan; nothing is left written (the writability probe removes its folder at once).

    Raises:
        OutputDirError: the folder is a file, holds files a run did not write, holds another run without
            ``--overwrite``, or ``--overwrite`` would delete the checkpoint being resumed; also when resuming in
            place from a checkpoint older than the run's latest (the two histories would mix).
            It is also raised when the folder cannot be created or written.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError('{0} {out} is a file, not a folder', 'output_dir', out=out)
    _check_writable(out, probe)
    entries = sorted(e for e in out.iterdir() if e.name != RUN_LOCK) if out.is_dir() else []
    foreign = [f for e in entries for f in _foreign_inside(e)]
    ours = [e for e in entries if not _foreign_inside(e)]
    run_dir = _run_dir_of(resume_ckpt) if resume_ckpt is not None else None
    if run_dir is not None and _same_path(run_dir, out):
        if overwrite:
            raise OutputDirError(
                '{0} with {1} {ckpt}: that checkpoint belongs to {2} {out}, which {0} would delete. Drop {0} to '
                'continue the run, or pass another {2} to continue it in a new folder', 'overwrite', 'resume',
                'output_dir', ckpt=resume_ckpt, out=out)
        newer = [p.name for p in list_checkpoints(out) if p.name > resume_ckpt.name]
        if newer:
            raise OutputDirError(
                '{0} {ckpt} is older than the run\'s latest checkpoints {newer}; continuing it in {out} would mix '
                'two histories. Continue it in a new folder ({1} <new>), or delete the newer checkpoints first',
                'resume', 'output_dir', ckpt=resume_ckpt, newer=newer, out=out)
        return RunPlan(out, 'continue', resume_ckpt)
    if foreign:
        shown = foreign[:10] + ([f'... {len(foreign) - 10} more'] if len(foreign) > 10 else [])
        raise OutputDirError(
            '{0} {out} holds files a run does not write: {shown}. {1} removes only a run\'s outputs ({outputs}), '
            'so it refuses such a folder: choose a new or empty {0}, or move those files', 'output_dir',
            'overwrite', out=out, shown=shown, outputs=', '.join(OUTPUT_ARTIFACTS))
    action = 'new' if resume_ckpt is None else 'fork'
    if not ours:
        return RunPlan(out, action, resume_ckpt)
    if not overwrite:
        present = sorted(p.name for p in ours)
        cont = ', {2} {out} to continue it' if resume_ckpt is None else ''
        raise OutputDirError('{0} {out} already holds a run ({present}); pass {1} to replace its outputs' + cont +
                             ', or choose another {0}', 'output_dir', 'overwrite', 'resume', out=out, present=present)
    return RunPlan(out, 'overwrite' if resume_ckpt is None else 'fork', resume_ckpt, remove=tuple(ours))


def clean_partial_writes(out: Path) -> List[str]:
    """Remove what interrupted writes left in a run folder; restore an export caught between its two renames.

    A killed run can leave ``checkpoints/.tmp-step_*`` (a checkpoint being written), ``.best.dropres-tmp-*``
    (an export being written) and ``.summary.json.dropres-tmp-*`` (an atomic file write). An export replaced
    in place is renamed to ``.best.dropres-old`` before the new one is renamed to ``best``; when ``best`` is
    missing, the old one is put back. Only these exact names are touched (:data:`files.TEMP_MARKER`): a user's
    ``.best.backup`` or an editor's swap file stays.

    Args:
        out: the run folder.

    Returns:
        The names removed or restored, relative to ``out``.
    """
    done: List[str] = []
    ckpt_root = out / CKPT_DIR
    if ckpt_root.is_dir():
        for p in sorted(ckpt_root.iterdir()):
            if p.name.startswith('.tmp-') and _CKPT_NAME.fullmatch(p.name):
                shutil.rmtree(p)
                done.append(f'{CKPT_DIR}/{p.name}')
    for name in _EXPORTS:
        old = replaced_name(out / name)
        if old.is_dir() and not (out / name).exists():
            os.replace(old, out / name)
            done.append(f'{name} (restored from {old.name})')
    if out.is_dir():
        for p in sorted(out.iterdir()):
            if not p.is_symlink() and _interrupted_write(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                done.append(p.name)
    if done:
        _logger.info('Removed what interrupted writes left in %s: %s', out, done)
    return done


def apply_plan(plan: RunPlan) -> None:
    """Carry out ``plan`` (main process only): remove the previous outputs, create ``checkpoints/``, clean up.

    Args:
        plan: what :func:`plan_run` decided.

    Raises:
        OutputDirError: the folder cannot be written (the message names it and the reason).
    """
    out = plan.output_dir
    try:
        for p in plan.remove:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if plan.remove:
            _logger.info('Overwrite: removed the previous run\'s %s from %s', sorted(p.name for p in plan.remove),
                         out)
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        clean_partial_writes(out)
    except OSError as e:
        raise OutputDirError('cannot write to {0} {out}: {why}{where}', 'output_dir', out=out, why=e.strerror or e,
                             where=f' ({e.filename})' if e.filename else '') from e
    _logger.info('Run folder %s', plan.describe())


# ----------------------------------------------------------------------------------------------
# resume compatibility


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from ``trainer_state.json`` (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def check_resume_settings(saved: Mapping[str, Any] | None, cfg: FinetuneConfig, ckpt: Path,
                          epochs_done: int) -> Dict[str, List[Any]]:
    """Compare this run's options with the checkpoint's, following :data:`RESUME_RULES`.

    Args:
        saved: the ``config`` the checkpoint's run recorded (None for checkpoints that predate it: not compared).
        cfg: this run's options.
        ckpt: the checkpoint (for the message).
        epochs_done: epochs the checkpoint has completed.

    Returns:
        ``{option: [checkpoint value, this run's value]}`` for the :data:`RECORDED` options that changed.

    Raises:
        CheckpointError: an option that must stay the same changed (all of them named, old and new value), or
            ``--epochs`` is below the epochs already completed.
    """
    if saved is None:
        _logger.warning('%s records no options (an older trainer): resume settings are not compared', ckpt)
        return {}
    now = _jsonable(dataclasses.asdict(cfg))
    defaults = _jsonable({f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                          for f in dataclasses.fields(cfg)})
    refused, changed = [], {}
    options: List[str] = ['resume', 'output_dir']  # the options the message names: '{0}', '{1}', ...
    values: Dict[str, Any] = {}
    for name, value in now.items():
        old = saved.get(name, defaults[name])  # an option added since the checkpoint was written: its default
        if old == value:
            continue
        rule = RESUME_RULES.get(name, SAME)
        if rule == SAME:
            i = len(options)
            options.append(name)
            values.update({f'old{i}': repr(old), f'new{i}': repr(value)})
            refused.append(f'{{{i}}}: checkpoint {{old{i}}}, this run {{new{i}}}')
        elif rule == RECORDED:
            changed[name] = [old, value]
    if cfg.epochs < epochs_done:
        options.append('epochs')
        refused.append(f'{{{len(options) - 1}}} {cfg.epochs} is fewer than the {epochs_done} epochs the checkpoint '
                       f'has completed')
    if refused:
        raise CheckpointError(
            '{0} {ckpt}: settings differ from the checkpoint\'s, and resuming would not continue the same run: '
            + '; '.join(refused) + '. Resume with the checkpoint\'s values, or start a new run in another {1} '
            '(docs/training.md lists what a resumed run may change)', *options, ckpt=ckpt, **values)
    if changed:
        _logger.info('Resumed with changed settings (recorded in summary.json): %s',
                     ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changed.items()))
    return changed


def check_resume_data(saved: Mapping[str, Any] | None, now: Mapping[str, Any], ckpt: Path) -> None:
    """Refuse to resume on other data than the checkpoint was trained on.

    Args:
        saved: the checkpoint's data signature (``trainer_state.json`` ``data``; None for older checkpoints).
        now: this run's signature (:func:`timm_dropres.training.data.data_signature`).
        ckpt: the checkpoint (for the message).

    Raises:
        CheckpointError: classes, image counts, or the images and labels themselves differ.
    """
    if saved is None:
        return
    diffs = []
    for key, what in (('label_names', 'classes'), ('in_chans', 'input channels'),
                      ('train_size', 'training images'), ('val_size', 'validation images')):
        if key in saved and saved[key] != now.get(key):
            diffs.append(f'{what}: checkpoint {saved[key]!r}, this run {now.get(key)!r}')
    if not diffs:
        for key, what in (('train_files', 'training'), ('val_files', 'validation')):
            if saved.get(key) and now.get(key) and saved[key] != now[key]:
                diffs.append(f'the {what} images or their labels differ (same count, other files)')
    if diffs:
        raise CheckpointError('{0} {ckpt}: the data differ from the data the checkpoint was trained on: {diffs}',
                              'resume', ckpt=ckpt, diffs='; '.join(diffs))


# ----------------------------------------------------------------------------------------------
# divergence and error messages


def nonfinite_tensors(module: nn.Module) -> List[str]:
    """Names of the floating-point parameters and buffers of ``module`` that hold a NaN or an infinity.

    One host sync for the whole module (the per-tensor flags are stacked on the device first).

    Args:
        module: the model (or its EMA copy).

    Returns:
        The qualified names of the tensors that are not finite (empty when all are).
    """
    named = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())
             if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu().tolist()
    return [n for (n, _), ok in zip(named, finite, strict=True) if not ok]


#: a validation loss above this many times ln(classes) (the loss of a uniform guess) means the run diverged:
#: 1000 ln(10) = 2303, far above any loss of a model that still learns, far below the 1e33 of momentum 5
EXPLODED_LOSS_FACTOR = 1000.0


def check_validation_loss(loss: float, num_classes: int, epoch: int, out: Path, last_end_step: int,
                          best: Mapping[str, Any] | None) -> None:
    """Stop a run whose validation loss is not finite or has exploded, before it is exported or checkpointed.

    Args:
        loss: the epoch's validation loss.
        num_classes: the class count (the limit is :data:`EXPLODED_LOSS_FACTOR` x ln(classes)).
        epoch: the epoch (1-based, for the message).
        out: the run folder (the message names the last checkpoint from before this epoch).
        last_end_step: the optimizer step of the last completed epoch's end (0: none yet).
        best: the trainer's best-epoch record (``epoch``, ``top1``), or None.

    Raises:
        TrainingDiverged: the loss is NaN, infinite or above the limit.
    """
    limit = EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))
    if math.isfinite(loss) and loss <= limit:
        return
    good = [c for c in list_checkpoints(out) if int(c.name[len(CKPT_PREFIX):]) <= last_end_step]
    if good:
        kept = f'the last epoch-end checkpoint is {good[-1]}'
    else:  # none yet, or keep_checkpoints rotated it out for checkpoints of the diverging epoch
        kept = 'no checkpoint from before this epoch is kept'
    if best is not None:
        kept += f'; best/ holds epoch {best["epoch"]} (top-1 {best["top1"]:.2f})'
    raise TrainingDiverged(
        'training diverged: the validation loss after epoch {epoch} is {loss:.4g}, above {limit:.4g} ({factor:g} x ln '
        '{classes} classes, the loss of a uniform guess). Stopped without exporting or checkpointing that epoch; '
        '{kept}. Lower {0} or {1}, or add {2}', 'lr', 'momentum', 'clip_grad', epoch=epoch, loss=loss, limit=limit,
        factor=EXPLODED_LOSS_FACTOR, classes=num_classes, kept=kept)


def error_line(e: BaseException) -> str:
    """The one line that explains ``e``.

    An error raised in a DataLoader worker comes back as the same exception type whose message is the
    worker's whole traceback; its last line is the original message.

    Args:
        e: the error.

    Returns:
        Its message, or the last line of a worker's traceback.
    """
    text = str(e).strip()
    if 'Original Traceback' in text:
        last = text.splitlines()[-1]
        m = re.match(r'^[\w.]+: ', last)
        return last[m.end():] if m else last
    return text


def first_line(e: BaseException, limit: int = 200) -> str:
    """The type and the first line of an error's message (torch's run for paragraphs).

    Args:
        e: the error.
        limit: the most characters of the message kept (more are cut and marked ``...``).

    Returns:
        ``'TypeName: first line'``, or ``'TypeName'`` for an empty message.
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else ''
    text = text if len(text) <= limit else text[:limit] + '...'
    return f'{type(e).__name__}: {text}' if text else type(e).__name__


def model_load_error(model: str, e: BaseException, weights: str | None = None) -> OptionError:
    """The error for a model that timm could not create or fill with its weights.

    Args:
        model: the ``model`` option's value.
        e: what ``timm.create_model`` raised (``TypeError`` for arguments the architecture does not take,
            ``RuntimeError``/``UnpicklingError`` for weights ``torch.load(weights_only=True)`` refuses or cannot
            read, ``RuntimeError`` for weights that do not fit).
        weights: the weights file, when one was named (the ``pretrained_file`` option).

    Returns:
        The error to raise, in one line: which model, which weights, and what timm or torch said.
    """
    src = f' from {weights}' if weights else ''
    if isinstance(e, TypeError):
        return OptionError('cannot build {model}: {said} (does its config.json or {0} hold arguments of another '
                           'model?)', 'model_kwargs', model=model, said=first_line(e, 300))
    if 'weights_only' in str(e) or isinstance(e, pickle.UnpicklingError):
        return OptionError(f'cannot load the weights of {model}{src}: torch.load(weights_only=True) refused them '
                           f'({first_line(e, 300)}). Only safetensors files and plain tensor state dicts are loaded, '
                           f'never arbitrary pickles; convert the checkpoint to safetensors '
                           f'(safetensors.torch.save_file)')
    return OptionError(f'cannot load the weights of {model}{src}: {first_line(e, 300)}')

