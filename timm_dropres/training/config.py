"""The options of ``dropres-finetune`` and ``dropres-validate``: one dataclass each, validated on creation.

Each field is a CLI flag (``--field-name``), a YAML key and a keyword of the library call; its help text is
the CLI's. ``__post_init__`` checks the values themselves (ranges, combinations) and nothing else: what needs
the model registry or the file system (the model name, a checkpoint file, a compile backend) is checked once
by :func:`timm_dropres.training.build.resolve_model`, which ``finetune`` calls before it creates anything.

Errors name options by their field names (:class:`OptionError`); a front end renders its own names for them
(the CLIs print ``--field-name``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

from ..checks import check_finetune_values, check_validate_values
from ..errors import OptionError
from ..models.layers import RES_DROP_POSITIONS, check_dropout_args, check_rate

__all__ = ['FinetuneConfig', 'ValidateConfig', 'OptionError', 'config_field', 'check_numbers']


def config_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text is the CLI's (one source for flags, YAML keys and docs).

    Args:
        default: the default value (lists and dicts are copied per instance).
        help: the flag's help text; the CLI appends the default unless the text already names it.
        **kw: further settings kept in the metadata: argparse's ``choices``, ``nargs``, ``const``, ``metavar``;
            ``aliases``, more option strings for the flag (timm's names, e.g. ``('-b',)``); ``amp_flags``,
            add timm's ``--amp``/``--amp-dtype`` for this mixed-precision field.

    Returns:
        A ``dataclasses.field`` with the help text and settings in its metadata.
    """
    meta = dict(help=help, **kw)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_f = config_field

#: ``create_model`` keywords the trainer always sets (the data's classes and channels, the weights):
#: ``model_kwargs`` may not hold them, nor a dropout option that is set by its own field.
MODEL_KWARGS_SET_ELSEWHERE = ('num_classes', 'in_chans', 'pretrained', 'pretrained_cfg_overlay')
_DROPOUT_OPTIONS = ('drop_rate', 'res_drop_rate', 'res_drop_pos', 'drop_path_rate', 'drop_block_rate')


def check_numbers(cfg: Any, *, non_negative: Sequence[str] = (), positive: Sequence[str] = (),
                  unit: Sequence[str] = ()) -> None:
    """Every float option finite, and the named ones in range (NaN and inf pass ``<``/``>`` tests unnoticed).

    Args:
        cfg: a config dataclass instance.
        non_negative: options that must be >= 0 when set.
        positive: options that must be > 0 (integers: >= 1) when set.
        unit: options that must lie in [0, 1] when set.

    Raises:
        OptionError: naming the option and the value.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise OptionError('{0} must be a finite number, got {value}', f.name, value=value)
    for names, ok, want in ((non_negative, lambda v: v >= 0, '>= 0'), (positive, lambda v: v > 0, '> 0'),
                            (unit, lambda v: 0 <= v <= 1, 'in [0, 1]')):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not ok(value):
                raise OptionError('{0} must be {want}, got {value}', name, want=want, value=value)


def _check_optimizer(name: str) -> None:
    """``name`` is an optimizer ``timm.optim.create_optimizer_v2`` knows (a ``lookahead_`` prefix allowed)."""
    import difflib

    from timm.optim import list_optimizers

    known = list_optimizers()
    base = name.lower()
    base = base[len('lookahead_'):] if base.startswith('lookahead_') else base
    if base not in known:
        close = difflib.get_close_matches(base, known, n=3)
        raise OptionError('{0} must be one of timm\'s {count} optimizers (timm.optim.list_optimizers()), '
                          'got {value}{hint}', 'opt', count=len(known), value=name,
                          hint=f'; did you mean {" or ".join(close)}?' if close else '')


@dataclass
class FinetuneConfig:
    """Every option of a fine-tuning run. Each field is a CLI flag (``--field-name``) and a YAML key."""
    # model
    model: str = _f('resnet18_dropres', 'timm model name (any; *_dropres for guideline dropout), or local-dir:<folder>')
    pretrained: bool = _f(False, 'start from pretrained weights (the classifier is replaced for the new class count)')
    pretrained_file: str | None = _f(None, 'load pretrained weights from this local .safetensors/.pth file instead of '
                                           'the Hub (timm pretrained_cfg_overlay: a different classifier or input '
                                           'channel count is adapted)', aliases=('--pretrained-path',))
    initial_checkpoint: str | None = _f(None, 'as timm train.py: load every weight of this .safetensors/.pth file (or '
                                              'of a saved folder\'s model.safetensors) into the model after it is '
                                              'built, strictly')
    drop_rate: float | None = _f(None, 'head dropout; *_dropres: before global pooling, other timm models: timm\'s '
                                       'own after-pool dropout (default: the model\'s)', aliases=('--drop',))
    res_drop_rate: float | None = _f(None, 'dropout rate in every residual block (*_dropres models only)')
    res_drop_pos: str | None = _f(None, 'residual dropout position (*_dropres models only)',
                                  choices=RES_DROP_POSITIONS)
    drop_path_rate: float | None = _f(None, 'stochastic depth rate, as timm train.py\'s --drop-path: drops whole '
                                            'residual branches; composes with the residual dropout',
                                      aliases=('--drop-path',))
    drop_block_rate: float | None = _f(None, 'DropBlock rate, as timm train.py\'s --drop-block (ResNet: in the last '
                                             'two stages)', aliases=('--drop-block',))
    model_kwargs: Dict[str, Any] = _f({}, 'extra timm.create_model keyword arguments, as timm train.py\'s '
                                      '--model-kwargs: key=value pairs (values read as Python literals)')
    sync_bn: bool = _f(False, 'convert BatchNorm to SyncBatchNorm under multi-process training (small per-GPU batches)')
    channels_last: bool = _f(False, 'use channels_last memory format (faster convs with mixed precision on GPU)')
    grad_checkpointing: bool = _f(False, 'recompute activations in the backward pass to save memory, as timm '
                                         'train.py (model.set_grad_checkpointing; dropout masks are replayed)')
    torchcompile: str | None = _f(None, 'torch.compile the model with this backend, as timm train.py '
                                        '(--torchcompile alone: inductor)', nargs='?', const='inductor',
                                  metavar='BACKEND')
    # data
    dataset: str = _f('', 'ImageFolder root, a timm dataset name (torch/cifar10, hfds/...), or fashion_mnist')
    data_dir: str | None = _f(None, 'root folder for timm dataset names (download target)')
    download: bool = _f(False, 'let torchvision download torch/* datasets (needs internet)')
    val_fraction: float | None = _f(None, 'hold-out fraction when an ImageFolder has no val/ folder (default 0.1)')
    train_subset: int | None = _f(None, 'train on a class-balanced subset of N images')
    val_subset: int | None = _f(None, 'validate on a class-balanced subset of N images')
    img_size: int | None = _f(None, 'input resolution (default: the model\'s pretrained resolution)')
    crop_pct: float | None = _f(None, 'eval center-crop fraction (default: the model\'s)')
    interpolation: str | None = _f(None, 'resize interpolation (default: the model\'s)')
    # augmentation and loss
    aa: str | None = _f(None, 'timm AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5 or original')
    hflip: float = _f(0.5, 'horizontal flip probability')
    color_jitter: float = _f(0.4, 'color jitter strength (0 to disable)')
    reprob: float = _f(0.0, 'random erasing probability')
    scale: List[float] | None = _f(None, 'RandomResizedCrop scale range (default timm 0.08 1.0)', nargs=2)
    ratio: List[float] | None = _f(None, 'RandomResizedCrop aspect ratio range', nargs=2)
    pad_crop: int = _f(0, 'N > 0: CIFAR-style training crops instead of RandomResizedCrop: pad N pixels, random '
                          'crop at --img-size, flip (He et al. 2016)')
    mixup: float = _f(0.0, 'mixup alpha (0 = off), timm Mixup')
    cutmix: float = _f(0.0, 'cutmix alpha (0 = off), timm Mixup')
    smoothing: float = _f(0.1, 'label smoothing')
    # optimisation
    opt: str = _f('adamw', 'timm optimizer name (adamw, sgd, lamb, ...)')
    lr: float = _f(1e-3, 'peak learning rate')
    weight_decay: float = _f(0.05, 'weight decay (not applied to norms and biases)')
    momentum: float = _f(0.9, 'SGD momentum')
    layer_decay: float | None = _f(None, 'layer-wise LR decay factor, e.g. 0.75 (timm param groups)')
    clip_grad: float | None = _f(None, 'clip the gradient norm to this value')
    sched: str = _f('cosine', 'timm scheduler (cosine, step, plateau, ...); stepped every optimizer update')
    epochs: int = _f(10, 'training epochs')
    decay_milestones: List[int] = _f([], 'epochs at which --sched multistep multiplies the lr by --decay-rate '
                                         '(as timm train.py)')
    decay_rate: float = _f(0.1, 'lr factor at each milestone (multistep, step)')
    warmup_epochs: float = _f(1, 'linear warmup epochs (fractions allowed)')
    warmup_lr: float = _f(1e-5, 'learning rate at the start of warmup')
    min_lr: float = _f(1e-6, 'learning rate at the end of the cosine decay')
    batch_size: int = _f(64, 'images per process per micro-step', aliases=('-b',))
    eval_batch_size: int | None = _f(None, 'images per process per eval step (default 2x --batch-size)',
                                     aliases=('-vb', '--validation-batch-size'))
    grad_accum_steps: int = _f(1, 'micro-steps per optimizer step (accelerate gradient accumulation)')
    mixed_precision: str = _f('no', 'accelerate mixed precision', choices=('no', 'fp16', 'bf16'), amp_flags=True)
    ema: bool = _f(False, 'keep an EMA of the weights (timm ModelEmaV3), evaluated alongside',
                   aliases=('--model-ema',))
    ema_decay: float = _f(0.999, 'EMA decay', aliases=('--model-ema-decay',))
    seed: int = _f(42, 'random seed (data order, augmentation, init, dropout)')
    # runtime
    cpu: bool = _f(False, 'force CPU even when a GPU is present')
    num_workers: int = _f(2, 'data loader worker processes per training process', aliases=('-j', '--workers'))
    output_dir: str = _f('runs/finetune', 'where checkpoints, best/, last/ and summary.json go')
    overwrite: bool = _f(False, 'replace the outputs of a previous run in --output-dir')
    resume: str | None = _f(None, 'continue from a run folder (its latest checkpoint) or a checkpoint folder')
    checkpoint_every: int = _f(0, 'also checkpoint every N optimizer steps (0: only at epoch ends)')
    keep_checkpoints: int = _f(2, 'keep the last K checkpoints', aliases=('--checkpoint-hist',))
    stop_after_steps: int | None = _f(None, 'stop (with a checkpoint) after N optimizer steps in total: a planned '
                                            'interruption, e.g. to fit a time slot; --resume continues')
    log_with: str | None = _f(None, 'accelerate tracker: tensorboard, wandb, all', choices=(
        'tensorboard', 'wandb', 'all'))
    log_every: int = _f(50, 'log training loss to trackers every N optimizer steps', aliases=('--log-interval',))
    progress: bool | None = _f(None, 'tqdm progress bars on the main process (default: only when stderr is a '
                                     'terminal, so a run logged to a file gets no bar refreshes)')

    def __post_init__(self) -> None:
        """Reject bad values up front, naming the option, before any process builds anything.

        Raises:
            OptionError: a value out of range, or options that do not go together.
            ValueError: a bad dropout rate or position (``timm_dropres.models.layers.check_dropout_args``).
        """
        if not self.model:
            raise OptionError('no model given: set {0} (a timm name, hf-hub:<repo id> or local-dir:<folder>)', 'model')
        check_numbers(self, non_negative=('weight_decay', 'momentum', 'warmup_epochs', 'warmup_lr', 'min_lr',
                                          'color_jitter', 'mixup', 'cutmix'),
                      positive=('eval_batch_size', 'img_size', 'crop_pct', 'layer_decay', 'clip_grad',
                                'train_subset', 'val_subset'), unit=('hflip', 'reprob'))
        check_dropout_args(self.drop_rate, self.res_drop_rate, self.res_drop_pos)
        for name in ('drop_path_rate', 'drop_block_rate'):  # timm's --drop-path / --drop-block, for any timm model
            if getattr(self, name) is not None:
                check_rate(name, getattr(self, name))
        set_elsewhere = set(MODEL_KWARGS_SET_ELSEWHERE) | {k for k in _DROPOUT_OPTIONS if getattr(self, k) is not None}
        overlap = sorted(set(self.model_kwargs) & set_elsewhere)
        if overlap:
            raise OptionError('{0} {overlap} are set by the trainer or by their own options ({1}, {2}, {3}, {4}, '
                              '{5}; classes and channels come from the data)', 'model_kwargs', 'drop_rate',
                              'res_drop_rate', 'res_drop_pos', 'drop_path_rate', 'drop_block_rate', overlap=overlap)
        positive = ('epochs', 'batch_size', 'grad_accum_steps', 'keep_checkpoints')
        for name in positive:
            if getattr(self, name) < 1:
                raise OptionError('{0} must be >= 1, got {value}', name, value=getattr(self, name))
        for name in ('checkpoint_every', 'num_workers', 'log_every'):
            if getattr(self, name) < 0:
                raise OptionError('{0} must be >= 0, got {value}', name, value=getattr(self, name))
        if self.sched == 'multistep' and not self.decay_milestones:
            raise OptionError('{0} multistep needs {1} (epochs, e.g. 81 122)', 'sched', 'decay_milestones')
        if self.decay_milestones and (sorted(self.decay_milestones) != list(self.decay_milestones)
                                      or not all(0 < m < self.epochs for m in self.decay_milestones)):
            raise OptionError('{0} must be increasing epochs in (0, {1}={epochs}), got {value}', 'decay_milestones',
                              'epochs', epochs=self.epochs, value=list(self.decay_milestones))
        if not 0.0 < self.decay_rate <= 1.0:
            raise OptionError('{0} must be in (0, 1], got {value}', 'decay_rate', value=self.decay_rate)
        if self.pad_crop < 0:
            raise OptionError('{0} must be >= 0, got {value}', 'pad_crop', value=self.pad_crop)
        if self.lr <= 0:
            raise OptionError('{0} must be > 0, got {value}', 'lr', value=self.lr)
        _check_optimizer(self.opt)
        if not 0.0 <= self.smoothing < 1.0:
            raise OptionError('{0} must be in [0, 1), got {value}', 'smoothing', value=self.smoothing)
        if self.mixed_precision not in ('no', 'fp16', 'bf16'):
            raise OptionError("{0} must be one of ['no', 'fp16', 'bf16'], got {value!r}", 'mixed_precision',
                              value=self.mixed_precision)
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise OptionError('{0} must be >= 1, got {value}', 'stop_after_steps', value=self.stop_after_steps)
        if self.ema and not 0.0 < self.ema_decay < 1.0:
            raise OptionError('{0} must be in (0, 1), got {value}', 'ema_decay', value=self.ema_decay)
        if self.torchcompile is not None and self.grad_checkpointing:
            # seen with torch 2.14 + timm 1.0.31 on every ResNet, dropres or not
            raise OptionError('{0} and {1} together fail in the backward pass of timm\'s ResNets (the compiled '
                              'checkpoint replays BatchNorm\'s in-place num_batches_tracked update); use one of them',
                              'torchcompile', 'grad_checkpointing')
        check_finetune_values(self)  # sizes, timm's choices (values only: nothing here reads a file)


@dataclass
class ValidateConfig:
    """Options of ``dropres-validate``; each field is a CLI flag (``--field-name``) and a YAML key."""
    model: str = _f('', 'timm model name or local-dir:<folder> (e.g. runs/x/best)')
    dataset: str = _f('', 'ImageFolder root, a timm dataset name (torch/cifar10, hfds/...), or fashion_mnist')
    split: str = _f('val', 'split to evaluate: val (validation/test) or train')
    data_dir: str | None = _f(None, 'root folder for timm dataset names')
    download: bool = _f(False, 'let torchvision download torch/* datasets')
    pretrained: bool = _f(False, 'load pretrained weights (implied for local-dir: and hf-hub: models)')
    num_classes: int | None = _f(None, 'classifier size for a plain timm name (default: the model\'s own, or the '
                                       'dataset\'s class count)')
    img_size: int | None = _f(None, 'input resolution (default: the model\'s)')
    crop_pct: float | None = _f(None, 'center-crop fraction (default: the model\'s)')
    batch_size: int = _f(128, 'images per process per step', aliases=('-b',))
    val_subset: int | None = _f(None, 'evaluate a class-balanced subset of N images')
    seed: int = _f(0, 'seed for --val-subset')
    num_workers: int = _f(2, 'data loader worker processes', aliases=('-j', '--workers'))
    mixed_precision: str = _f('no', 'accelerate autocast', choices=('no', 'fp16', 'bf16'), amp_flags=True)
    cpu: bool = _f(False, 'force CPU even when a GPU is present')
    channels_last: bool = _f(False, 'channels_last memory format')
    results_file: str | None = _f(None, 'write the metrics as JSON here')
    overwrite: bool = _f(False, 'allow replacing an existing --results-file')

    def __post_init__(self) -> None:
        """Reject bad values up front, naming the option.

        Raises:
            OptionError: a value out of range.
        """
        check_numbers(self, positive=('num_classes', 'img_size', 'crop_pct', 'val_subset'))
        if not self.model:
            raise OptionError('no model given: set {0} (a timm name or local-dir:<folder>)', 'model')
        if self.batch_size < 1:
            raise OptionError('{0} must be >= 1, got {value}', 'batch_size', value=self.batch_size)
        if self.num_workers < 0:
            raise OptionError('{0} must be >= 0, got {value}', 'num_workers', value=self.num_workers)
        check_validate_values(self)  # sizes (values only)
