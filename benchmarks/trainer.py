"""Figure 4: trainer efficiency. ``timm_dropres.training.trainer.finetune`` img/s vs two references on the same data.

All three train the same model (``<arch>_dropres`` with head dropout before pooling at ``HEAD_RATE`` (0.1) and
``--res-drop-rate``, timm AdamW, label smoothing 0.1)
for one epoch over the same in-memory, preprocessed tensors, at the same batch size:

* **trainer**: ``finetune(cfg, data=...)``; its img/s is ``summary['throughput']['train_img_per_s']``
  (the training loop only: evaluation and checkpoint writes are excluded by the trainer itself).
* **pure step**: the same steps on the tensors directly, no loader, no accelerate. Target: trainer
  >= 0.9x of it (data never starves the model).
* **accelerate loop**: a minimal hand-written ``Accelerator.prepare`` + ``DataLoader`` loop, the
  code a user would otherwise write. Target: trainer >= 1.0x of it.

Each of the three is timed over the whole epoch including its first step, because that is what the
trainer's summary reports; the three are run interleaved, ``--reps`` times.

    python benchmarks/trainer.py
    python benchmarks/trainer.py --device cuda --dtype bfloat16 --img-size 224 --batch-sizes 128 --steps 30
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn

try:
    from benchmarks import common as C
    from benchmarks import training as T
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]
    import training as T  # type: ignore[no-redef]

from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, TensorDataset

from timm_dropres.training.config import FinetuneConfig
from timm_dropres.training.data import DataBundle, TensorImageDataset
from timm_dropres.training.trainer import finetune

PURE_TARGET = 0.9
LOOP_TARGET = 1.0
ARCHS = ('resnet18',)
NUM_CLASSES = 10
SMOOTHING = 0.1
HEAD_RATE = T.HEAD_RATE  # the head dropout of the earlier figures (the package default is 0)
MIXED = {'float32': 'no', 'bfloat16': 'bf16', 'float16': 'fp16'}
SMOKE = ['--threads', '1',
         '--archs', 'test_resnet', '--batch-sizes', '4', '--img-size', '32', '--reps', '1', '--steps', '2']


def _data(n: int, img_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img_size, img_size, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _model(arch: str, res_drop_rate: float) -> nn.Module:
    return timm.create_model(arch + '_dropres', num_classes=NUM_CLASSES, drop_rate=HEAD_RATE,
                             res_drop_rate=res_drop_rate)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # the trainer's defaults (FinetuneConfig: adamw, lr 1e-3, weight decay 0.05)
    return create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)


def run_trainer(args: argparse.Namespace, arch: str, bs: int, cl: bool, x: torch.Tensor, y: torch.Tensor,
                workdir: Path) -> float:
    """img/s as reported by the trainer's summary."""
    n_val = 2 * bs
    xv, yv = _data(n_val, args.img_size, seed=1)
    data = DataBundle(train=TensorImageDataset(x, y), val=TensorImageDataset(xv, yv),
                      label_names=[f'c{i}' for i in range(NUM_CLASSES)], in_chans=3,
                      description='in-memory tensors', preprocessed=True)
    cfg = FinetuneConfig(model=arch + '_dropres', drop_rate=HEAD_RATE, res_drop_rate=args.res_drop_rate, dataset='',
                         epochs=1, batch_size=bs, warmup_epochs=0,
                         smoothing=SMOOTHING, mixed_precision=MIXED[args.dtype], channels_last=cl,
                         cpu=args.device == 'cpu', num_workers=args.num_workers, output_dir=str(workdir),
                         overwrite=True, progress=False, img_size=args.img_size, seed=0)
    summary = finetune(cfg, data=data)
    return float(summary['throughput']['train_img_per_s'])


def run_pure(args: argparse.Namespace, arch: str, bs: int, cl: bool, x: torch.Tensor, y: torch.Tensor) -> float:
    """The same epoch as bare train steps on device-resident tensor slices."""
    device, dtype = C.resolve_device(args.device), C.resolve_dtype(args.dtype)
    torch.manual_seed(0)
    model = C.prepare(_model(arch, args.res_drop_rate).train(), device, cl)
    opt = _optimizer(model)
    crit = nn.CrossEntropyLoss(label_smoothing=SMOOTHING)
    fmt = torch.channels_last if cl else torch.contiguous_format
    batches = [(x[i:i + bs].to(device).contiguous(memory_format=fmt), y[i:i + bs].to(device))
               for i in range(0, len(x) - bs + 1, bs)]
    C.sync(device)
    t0 = time.perf_counter()
    for xb, yb in batches:
        with C.autocast(device, dtype):
            loss = crit(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    C.sync(device)
    return len(batches) * bs / (time.perf_counter() - t0)


def run_accelerate_loop(args: argparse.Namespace, arch: str, bs: int, cl: bool, x: torch.Tensor,
                        y: torch.Tensor) -> float:
    """What a user writes by hand with accelerate: prepare(), a DataLoader, backward, step."""
    acc = Accelerator(cpu=args.device == 'cpu', mixed_precision=MIXED[args.dtype])
    torch.manual_seed(0)
    model = _model(arch, args.res_drop_rate)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True,
                        num_workers=args.num_workers)
    model, opt, loader = acc.prepare(model, opt, loader)
    crit = nn.CrossEntropyLoss(label_smoothing=SMOOTHING)
    model.train()
    C.sync(acc.device)
    t0 = time.perf_counter()
    n = 0
    for xb, yb in loader:
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = crit(model(xb), yb)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += xb.shape[0]
    C.sync(acc.device)
    return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    device = C.resolve_device(args.device)
    rows, records = [], []
    logging.getLogger('timm_dropres').setLevel(logging.WARNING)  # keep the trainer's epoch logs out of the table
    with tempfile.TemporaryDirectory(prefix='dropres-bench-') as tmp:
        for arch in args.archs:
            for cl in C.layouts(args.channels_last):
                layout = 'channels_last' if cl else 'contiguous'
                for bs in args.batch_sizes:
                    x, y = _data(args.steps * bs, args.img_size)
                    runs: dict[str, Callable[[], float]] = {
                        'trainer': lambda: run_trainer(args, arch, bs, cl, x, y, Path(tmp) / 'run'),  # noqa: B023
                        'pure': lambda: run_pure(args, arch, bs, cl, x, y),  # noqa: B023
                        'loop': lambda: run_accelerate_loop(args, arch, bs, cl, x, y),  # noqa: B023
                    }
                    ips: dict[str, list[float]] = {k: [] for k in runs}
                    for i in range(args.reps):  # interleaved, order flipped every repetition
                        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                            ips[name].append(runs[name]())
                    vs_pure = C.Stat.of([t / p for t, p in zip(ips['trainer'], ips['pure'], strict=True)])
                    vs_loop = C.Stat.of([t / p for t, p in zip(ips['trainer'], ips['loop'], strict=True)])
                    st = {k: C.Stat.of(v) for k, v in ips.items()}
                    rows.append([f'{arch}_dropres', layout, bs, args.steps, C.fmt_stat(st['trainer']),
                                 C.fmt_stat(st['pure']), C.fmt_stat(st['loop']), C.fmt_ratio(vs_pure),
                                 C.ratio_verdict(vs_pure, PURE_TARGET), C.fmt_ratio(vs_loop),
                                 C.ratio_verdict(vs_loop, LOOP_TARGET)])
                    records.append(dict(arch=arch, layout=layout, batch=bs, **st, vs_pure=vs_pure, vs_loop=vs_loop))
    headers = ['model', 'layout', 'batch', 'steps', 'trainer img/s', 'pure step img/s', 'accelerate loop img/s',
               f'trainer / pure (target >= {PURE_TARGET})', 'met', f'trainer / loop (target >= {LOOP_TARGET})',
               'met']
    title = (f'### Figure 4: trainer efficiency (one epoch of in-memory tensors, {args.dtype}, {args.img_size}px, '
             f'{args.num_workers} loader workers, res_drop_rate {args.res_drop_rate}; img/s: median (min–max) of '
             f'{args.reps} interleaved reps; {C.ci_note(args.reps)})')
    return '\n'.join([title, '', C.environment(device), '', C.markdown_table(headers, rows)]), records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = C.base_parser(__doc__.splitlines()[0], archs=ARCHS, batch_sizes=(16,), img_size=64, reps=5,
                      smoke_help='tiny run (test_resnet, 32 px, 2 steps) so tests keep the script alive',
                      channels_last='no')
    p.add_argument('--steps', type=int, default=20, help='optimizer steps per epoch (default: 20)')
    p.add_argument('--num-workers', type=int, default=0,
                   help='DataLoader workers for the trainer and the accelerate loop (default: 0; tensors are '
                        'already in memory)')
    T.add_res_drop_rate(p)
    args = C.parse_args(p, argv, SMOKE)
    if args.steps < 1:
        p.error(f'--steps must be >= 1, got {args.steps}')
    if args.num_workers < 0:
        p.error(f'--num-workers must be >= 0, got {args.num_workers}')
    if args.clock != 'wall':
        p.error('--clock cpu is not supported by figure 4: the trainer reports wall-clock img/s')
    if args.compile:
        p.error('--compile is not supported by figure 4: the trainer has no compile option to compare against')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return C.emit(args, *run(args), script='trainer')


if __name__ == '__main__':
    raise SystemExit(main())
