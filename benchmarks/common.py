"""Shared harness for the benchmark scripts: interleaved timing, peak memory, tables, environment.

Every figure is a ratio of two things measured side by side in one process. Shared machines drift
(other jobs, thermal, frequency), so the cases are interleaved (A B, B A, A B, ...: the order flips
each repetition to cancel linear drift) after a warm-up, and each ratio is the median of the ratios of
*adjacent* repetitions, with their min-max. A drift that hits both sides of a pair cancels. A target is
judged on the confidence interval of that median (``median_ci``, ``ratio_verdict``): met, missed, or not
resolved when the interval holds the target.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# the benchmark scripts run as files (`python benchmarks/x.py`) from a checkout; make the package importable
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__all__ = [
    'DTYPES', 'Stat', 'base_parser', 'resolve_device', 'resolve_dtype', 'sync', 'interleaved', 'throughput',
    'paired_ratio', 'peak_step_memory', 'markdown_table', 'environment', 'autocast', 'make_batch', 'prepare',
    'fmt_stat', 'verdict', 'count_aten_ops', 'ratio_verdict', 'check_args', 'layouts', 'device_name',
    'environment_info', 'add_json_flag', 'emit', 'to_jsonable', 'median_ci', 'fmt_ratio', 'ci_note',
    'CI_LEVEL',
]

#: Confidence level of the intervals the verdicts use (``median_ci``).
CI_LEVEL = 0.95

#: ``--clock`` choices: wall-clock time, or this process's CPU time (see ``interleaved``).
CLOCKS: dict[str, Callable[[], float]] = {'wall': time.perf_counter, 'cpu': time.process_time}

DTYPES: dict[str, torch.dtype] = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass(frozen=True)
class Stat:
    """Median with the min-max range of a set of repetitions and a confidence interval for the median.

    ``ci_lo``/``ci_hi`` bound the median at a confidence of at least ``ci_level`` (``median_ci``); a ``Stat``
    built by hand without them uses its min-max range in their place (``interval``).
    """

    median: float
    lo: float
    hi: float
    ci_lo: float | None = None
    ci_hi: float | None = None
    ci_level: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError('Stat.of() needs at least one value')
        ci_lo, ci_hi, level = median_ci(values)
        return cls(statistics.median(values), min(values), max(values), ci_lo, ci_hi, level)

    @property
    def interval(self) -> tuple[float, float]:
        """The confidence interval of the median, or the min-max range where none was computed."""
        if self.ci_lo is None or self.ci_hi is None:
            return self.lo, self.hi
        return self.ci_lo, self.ci_hi


def median_ci(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """Distribution-free confidence interval for the median of ``values``, from their order statistics.

    With the values sorted, ``[x_k, x_(n+1-k)]`` (1-based) holds the true median with probability
    ``1 - 2 P(B < k)``, ``B ~ Binomial(n, 1/2)``, whatever the distribution of independent repetitions (the sign
    test's interval; a drift that outlasts a pair makes it optimistic, which the interleaving limits); ``k`` is
    the largest whose coverage is at least ``level``. Below 6 values no ``k`` reaches 95 %: the interval is then
    the min-max range, with its smaller coverage ``1 - 2**(1 - n)`` (94 % for 5, 75 % for 3), which is returned.

    Args:
        values: one number per repetition (for a ratio: the ratio of each pair of adjacent repetitions).
        level: the coverage wanted, in (0, 1).

    Returns:
        ``(lower, upper, coverage)``.

    Raises:
        ValueError: ``values`` is empty or ``level`` is not in (0, 1).

    Example:
        >>> lower, upper, coverage = median_ci([float(v) for v in range(1, 22)])
        >>> lower, upper, round(coverage, 3)  # 21 values: the 6th and the 16th
        (6.0, 16.0, 0.973)
    """
    if not values:
        raise ValueError('median_ci() needs at least one value')
    xs = sorted(values)
    k, coverage = _median_rank(len(xs), level)
    return xs[k - 1], xs[len(xs) - k], coverage


def _median_rank(n: int, level: float) -> tuple[int, float]:
    """``median_ci``'s rank ``k`` for ``n`` values and that interval's coverage (``k = 1``: min-max)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f'level must be in (0, 1), got {level!r}')
    # below = 2**n * P(B < k), summed in exact integers; the coverage is 1 - 2 * below / 2**n
    total, below, k = 2 ** n, 1, 1  # below = comb(n, 0): P(B < 1)
    while k + 1 <= (n + 1) // 2:
        wider = below + math.comb(n, k)  # P(B < k + 1)
        if 1.0 - 2 * wider / total < level:
            break
        below, k = wider, k + 1
    return k, 1.0 - 2 * below / total


def ci_note(reps: int) -> str:
    """How a table's ratio cells read: ``median [confidence interval]`` and the interval's coverage at ``reps``."""
    level = _median_rank(reps, CI_LEVEL)[1] if reps > 0 else 0.0
    return f'ratios: median [{100 * level:.0f} % confidence interval of the median, from {reps} pairs]'


def base_parser(description: str, *, archs: Sequence[str], batch_sizes: Sequence[int], img_size: int,
                reps: int, smoke_help: str, channels_last: str = 'both') -> argparse.ArgumentParser:
    """The flags every benchmark script shares, so run_all and gpu_check.sh can drive them alike."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--smoke', action='store_true', help=smoke_help)
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='where to run (default: cpu)')
    p.add_argument('--dtype', default='float32', choices=tuple(DTYPES),
                   help='float32, or bfloat16/float16 (autocast for training, weights cast for inference)')
    p.add_argument('--channels-last', default=channels_last, choices=('no', 'yes', 'both'),
                   help=f"contiguous ('no'), channels_last ('yes') or each in turn ('both'; default: {channels_last})")
    p.add_argument('--compile', action='store_true', help='torch.compile both models (compile time is excluded)')
    p.add_argument('--archs', nargs='+', default=list(archs), help=f'base timm archs (default: {" ".join(archs)})')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=list(batch_sizes),
                   help=f'batch sizes (default: {" ".join(map(str, batch_sizes))})')
    p.add_argument('--img-size', type=int, default=img_size, help=f'square input size (default: {img_size})')
    p.add_argument('--reps', type=int, default=reps, help=f'interleaved repetitions per case (default: {reps})')
    p.add_argument('--warmup', type=int, default=1, help='untimed iterations per case before timing (default: 1)')
    p.add_argument('--iters', type=int, default=1, help='iterations per timed repetition (default: 1)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (default: leave torch to decide)')
    p.add_argument('--clock', default='wall', choices=tuple(CLOCKS),
                   help="'wall' (default) or 'cpu': process CPU time, for a shared CPU; use with --threads 1")
    add_json_flag(p)
    return p


def add_json_flag(p: argparse.ArgumentParser) -> None:
    """``--json FILE``: every script appends its records there as one JSON line (``emit``)."""
    p.add_argument('--json', default=None, metavar='FILE',
                   help='also append this run (arguments, environment, records) as one JSON line to FILE; '
                        'benchmarks/gpu_summary.py turns such a file into the summary gpu_check.sh writes')


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None, smoke: list[str]) -> argparse.Namespace:
    """Parse ``argv`` (default: the command line); ``--smoke`` prepends ``smoke``, so explicit flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--smoke' in argv:
        argv = smoke + argv
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values argparse's types cannot: non-positive counts and sizes."""
    for name in ('reps', 'iters', 'img_size'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.warmup < 0:
        p.error(f'--warmup must be >= 0, got {args.warmup}')
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        p.error(f'--batch-sizes must all be >= 1, got {bad}')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == 'cpu' and args.device != 'cpu':
        p.error(f"--clock cpu times host CPU work and cannot time --device {args.device}; use --clock wall")


def layouts(choice: str) -> list[bool]:
    """``--channels-last`` value -> list of channels_last flags to run."""
    return {'no': [False], 'yes': [True], 'both': [False, True]}[choice]


def resolve_device(name: str) -> torch.device:
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda requested but torch.cuda.is_available() is False; use --device cpu')
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f'dtype must be one of {list(DTYPES)}, got {name!r}')
    return DTYPES[name]


def sync(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock interval covers the work it launched."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision the way the trainer (accelerate) does it: autocast, fp32 master weights."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool,
            dtype: torch.dtype | None = None) -> torch.nn.Module:
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_batch(batch_size: int, img_size: int, num_classes: int, device: torch.device, channels_last: bool,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    return x, y


def interleaved(cases: dict[str, Callable[[], object]], *, device: torch.device, reps: int, warmup: int,
                iters: int, clock: str = 'wall') -> dict[str, list[float]]:
    """Seconds per iteration of each case, ``reps`` times, with the cases interleaved.

    Repetition ``i`` runs the cases in order when ``i`` is even and reversed when odd (A B, B A, ...),
    so a steady drift in machine speed biases neither side. The garbage collector is paused while timing.
    ``clock='cpu'`` times with this process's CPU time instead of the wall clock: on a shared CPU with one
    torch thread it counts the work done and not the time spent waiting for a core.
    """
    if clock not in CLOCKS:
        raise ValueError(f'clock must be one of {list(CLOCKS)}, got {clock!r}')
    if clock == 'cpu' and device.type != 'cpu':
        raise ValueError(f"clock='cpu' measures host CPU time and cannot time work on {device.type}; use 'wall'")
    timer = CLOCKS[clock]
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
        sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(reps):
            for name in (names if i % 2 == 0 else names[::-1]):
                fn = cases[name]
                sync(device)
                t0 = timer()
                for _ in range(iters):
                    fn()
                sync(device)
                times[name].append((timer() - t0) / iters)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def throughput(seconds: Sequence[float], items: int) -> Stat:
    """Items per second per repetition -> median and range."""
    return Stat.of([items / s for s in seconds])


def paired_ratio(num_seconds: Sequence[float], den_seconds: Sequence[float]) -> Stat:
    """Throughput ratio num/den from adjacent repetitions (den_time / num_time), median and range."""
    if len(num_seconds) != len(den_seconds):
        raise ValueError(f'paired_ratio needs equal repetition counts, got {len(num_seconds)} and {len(den_seconds)}')
    return Stat.of([d / n for n, d in zip(num_seconds, den_seconds, strict=True)])


def peak_step_memory(step: Callable[[], object], device: torch.device, *track: object) -> int:
    """Peak bytes of tensor memory while ``step()`` runs (params, grads, optimizer state and activations).

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: torch's ``MemTracker``
    (a dispatch mode that counts every tensor storage alive at each op, including the ones passed in
    ``track``) -- the CPU analogue of ``max_memory_allocated``; RSS would mix in the allocator's caching
    and the Python heap, and summing the profiler's CPU memory events gave an implausible peak here.
    Call it after one warm step so optimizer state exists, as in steady-state training.
    """
    gc.collect()
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as e:  # pragma: no cover - torch builds without torch.distributed
        raise SystemExit(f'CPU peak memory needs torch.distributed._tools.mem_tracker ({e})') from e
    tracker = MemTracker()
    tracker.track_external(*track)
    with tracker:
        step()
    peaks = tracker.get_tracker_snapshot('peak')
    return int(sum(stats['Total'] for dev, stats in peaks.items() if torch.device(dev).type == device.type))


def fmt_stat(s: Stat, digits: int = 1) -> str:
    """``median (min–max)``."""
    return f'{s.median:.{digits}f} ({s.lo:.{digits}f}–{s.hi:.{digits}f})'


def fmt_ratio(s: Stat, digits: int = 3) -> str:
    """``median [lower, upper]``: a ratio with the confidence interval of its median (``median_ci``)."""
    lo, hi = s.interval
    return f'{s.median:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]'


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return 'yes' if ok else 'NO'


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> str:
    """One line naming the machine and versions, printed above every table."""
    import timm
    load = ', '.join(f'{v:.1f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'
    cpu = f'{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, load average {load}'
    return (f'device: {device.type} ({device_name(device)}); {cpu}; torch {torch.__version__}, '
            f'timm {timm.__version__}, python {platform.python_version()}')


def environment_info(device: torch.device) -> dict:
    """The ``environment`` line as a dict: device, versions, threads and the residual dropout kernel choice."""
    import timm

    from timm_dropres.models import layers

    info = dict(device=device.type, device_name=device_name(device), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(), cuda=torch.version.cuda, dropout_kernel=layers.get_dropout_kernel())
    try:
        import triton
        info['triton'] = triton.__version__
    except ImportError:
        info['triton'] = None
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(device_memory_mib=props.total_memory // 2 ** 20, capability=f'{props.major}.{props.minor}')
    return info


def to_jsonable(obj: object) -> object:
    """Records as JSON values: ``Stat`` -> ``{median, lo, hi, ci_lo, ci_hi, ci_level}``, tuples -> lists,
    dtypes/devices -> strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def emit(args: argparse.Namespace, table: str, records: list[dict], script: str) -> int:
    """What every script's ``main`` does with its result: print the table; with ``--json FILE`` also append
    ``{script, args, environment, records}`` to FILE as one line (append: one file collects a whole check)."""
    if getattr(args, 'json', None):
        device = torch.device(getattr(args, 'device', 'cpu'))
        line = dict(script=script, args=to_jsonable(vars(args)), environment=environment_info(device),
                    records=to_jsonable(records))
        with open(args.json, 'a', encoding='utf-8') as f:
            f.write(json.dumps(line) + '\n')
    return print_table(table)


def count_aten_ops(fn: Callable[[], object]) -> int:
    """Number of ATen ops ``fn`` dispatches: a noise-free measure of the work a forward does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


def ratio_verdict(ratio: Stat, target: float, higher_is_better: bool = True) -> str:
    """Whether a measured ratio meets ``target``, judged on the confidence interval of its median.

    Returns:
        ``'yes'`` when the whole interval meets the target, ``'NO'`` when the whole interval misses it, and
        ``'not resolved'`` when the interval holds the target (more repetitions would narrow it). A ``Stat``
        without an interval is judged on its min-max range. Below 6 pairs the interval is the min-max range,
        whose coverage is below 95 % (94 % at 5, 75 % at 3: ``ci_note`` prints it in the table's title).

    Example:
        >>> ratio_verdict(Stat(0.99, 0.95, 1.02, 0.985, 0.995, 0.97), 0.98)
        'yes'
    """
    lo, hi = ratio.interval
    if higher_is_better:
        return 'yes' if lo >= target else 'NO' if hi < target else 'not resolved'
    return 'yes' if hi <= target else 'NO' if lo > target else 'not resolved'


def print_table(table: str) -> int:
    """What every script's ``main`` does with its markdown: print it, flushed, and report success."""
    print(table, flush=True)
    return 0
