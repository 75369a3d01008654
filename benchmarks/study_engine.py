"""The study engine against the harness it replaces: the same over-fitting runs, timed by CPU clock.

Each case is one run of ``configs/studies/overfit.yaml`` (the engine: :func:`timm_dropres.study.runner.run_one`,
i.e. ``dropres-finetune``'s trainer on in-memory tensors) and the same (architecture, configuration, seed) of
``configs/study_overfit.yaml`` through the first study's private loop (``ablation_harness.run_one``, moved out of
the package into ``benchmarks/`` when the package kept one training loop; the measurement was taken at commit
f9dd426 with the loop still in ``research.ablation``, and the copy here is the same loop). Cases run
interleaved (harness, engine, harness, engine, ...) in one process with one torch thread. Data preparation is
timed apart, once per side. The clock is this process's CPU time (``time.process_time``), because other
processes share the machine; wall time is printed too. The two do not do identical work, and the table says
what differs: the engine validates 1,000 held-out images every epoch, writes a checkpoint per epoch and evaluates
the training images in eval mode; the harness evaluates 1,000 test images every 3 epochs and measures the
variance shift on 500 images.

    python benchmarks/study_engine.py                                   # resnet18, none + residual, seed 0
    python benchmarks/study_engine.py --engine-val-subset 333                 # equal evaluation work
    python benchmarks/study_engine.py --arch preresnet20 --configs none default --seeds 0 1
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks import ablation_harness as harness
except ImportError:  # run as a file: python benchmarks/study_engine.py
    import ablation_harness as harness  # type: ignore[no-redef]
from timm_dropres.recipes import find_recipe
from timm_dropres.research import ablation
from timm_dropres.study.runner import finetune_config, run_data, run_one
from timm_dropres.study.spec import Run, load_study_spec

SMOKE = ['--epochs', '1', '--test-subset', '500']


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='resnet18', help='architecture name of both over-fitting specs')
    p.add_argument('--configs', nargs='+', default=['none', 'residual'], help='configurations (both specs)')
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--epochs', type=int, default=None, help='override the specs\' 30 epochs (both sides)')
    p.add_argument('--test-subset', type=int, default=None, help='test on a subset (both sides; smoke runs)')
    p.add_argument('--engine-val-subset', type=int, default=None,
                   help='validate the engine\'s runs on this many images per epoch (e.g. 333: 30 epochs x 333 = the '
                   'harness\'s 10 x 1,000 curve images), to compare the loops at equal evaluation work')
    p.add_argument('--smoke', action='store_true', help=f'a seconds-long check that it runs: {" ".join(SMOKE)}')
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args(list(argv or []) + SMOKE)
    for c in args.configs:
        if c not in ablation.CONFIGS:
            p.error(f'--configs: {c!r} is not a configuration of both studies; valid: {list(ablation.CONFIGS)}')
    if args.engine_val_subset is not None and args.engine_val_subset < 1:
        p.error(f'--engine-val-subset must be >= 1, got {args.engine_val_subset}')
    if args.epochs is not None and args.epochs < 1:
        p.error(f'--epochs must be >= 1, got {args.epochs}')
    return args


def _specs(args: argparse.Namespace, tmp: Path):
    old = ablation.load_spec(find_recipe('study_overfit'))
    new = load_study_spec(find_recipe('studies/overfit'))
    new = dataclasses.replace(new, out_dir=str(tmp / 'records'), work_dir=str(tmp / 'work'))
    if args.epochs is not None:
        old = dataclasses.replace(old, schedule=dataclasses.replace(
            old.schedule, epochs=args.epochs, curve_every=min(old.schedule.curve_every, args.epochs)))
        new = dataclasses.replace(new, train=dict(new.train, epochs=args.epochs))
    if args.engine_val_subset is not None:
        new = dataclasses.replace(new, data=dataclasses.replace(new.data, val_subset=args.engine_val_subset))
    if args.test_subset is not None:
        old = dataclasses.replace(old, data=dataclasses.replace(old.data, test_subset=args.test_subset))
        new = dataclasses.replace(new, data=dataclasses.replace(new.data, test_subset=args.test_subset))
    return old, new


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        old, new = _specs(args, Path(d))
        arch_old = next(a for a in old.architectures if a.name == args.arch)
        arch_new = next(a for a in new.architectures if a.name == args.arch)
        c0 = time.process_time()
        data_old = harness.load_fmnist_data(old.data)
        prep_old = time.process_time() - c0
        c0 = time.process_time()
        probe = Run(arch_new, new.config(args.configs[0]), args.seeds[0])
        run_data(new.data.for_seed(probe.seed), finetune_config(new, probe, Path(d) / 'probe'), arch_new)
        prep_new = time.process_time() - c0
        rows, tot = [], dict(h_cpu=0.0, e_cpu=0.0, h_wall=0.0, e_wall=0.0)
        for seed in args.seeds:
            for name in args.configs:
                c0, w0 = time.process_time(), time.perf_counter()
                rec_h = harness.run_one(old, arch_old, ablation.get_config(name), seed, data_old)
                h_cpu, h_wall = time.process_time() - c0, time.perf_counter() - w0
                c0, w0 = time.process_time(), time.perf_counter()
                rec_e = run_one(new, Run(arch_new, new.config(name), seed), log=lambda m: None)
                e_cpu, e_wall = time.process_time() - c0, time.perf_counter() - w0
                rows.append((name, seed, h_cpu, e_cpu, h_wall, e_wall, rec_h['top1'], rec_e['top1']))
                for k, v in zip(('h_cpu', 'e_cpu', 'h_wall', 'e_wall'), (h_cpu, e_cpu, h_wall, e_wall), strict=True):
                    tot[k] += v
    load1 = os.getloadavg()[0]
    print(f'Study engine vs the first over-fitting harness: {args.arch}, {old.schedule.epochs} epochs, one torch '
          f'thread, CPU time of this process (`python benchmarks/study_engine.py {shlex.join(argv or sys.argv[1:])}`'
          f'; torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load average {load0:.1f} at '
          f'the start and {load1:.1f} at the end: other processes shared the CPU)')
    print()
    print('| configuration | seed | harness CPU s | engine CPU s | engine / harness (CPU) | harness wall s | '
          'engine wall s | top-1 harness / engine |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for name, seed, hc, ec, hw, ew, th, te in rows:
        print(f'| {name} | {seed} | {hc:.1f} | {ec:.1f} | {ec / hc:.2f} | {hw:.1f} | {ew:.1f} | {th:.2f} / {te:.2f} |')
    print(f'| all | | {tot["h_cpu"]:.1f} | {tot["e_cpu"]:.1f} | {tot["e_cpu"] / tot["h_cpu"]:.2f} | '
          f'{tot["h_wall"]:.1f} | {tot["e_wall"]:.1f} | |')
    print()
    print(f'Data preparation (once per process): harness {prep_old:.1f} s CPU, engine {prep_new:.1f} s CPU. Engine '
          f'validation: {new.data.val_subset} images every epoch; harness curve: {old.schedule.curve_images} test '
          f'images every {old.schedule.curve_every} epochs.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
