"""``make bench``: every figure with its defaults, printed as one markdown report.

Each figure runs in this process with its own defaults (CPU: small images, a few repetitions, about
7 minutes on 2 shared cores in total); ``--device``, ``--dtype``, ``--compile``, ``--threads``, ``--clock`` and
``--smoke`` pass through to all of them. On CPU the default is one thread timed by process CPU time,
because on a shared machine wall-clock ratios are mostly noise. Paste the output into
``docs/benchmarks.md`` with the command and machine.

    python benchmarks/run_all.py                       # what make bench runs
    python benchmarks/run_all.py --only 1 2            # some figures (2 also gives figure 3)
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

try:
    from benchmarks import ceiling, compile_check, inference, trainer, training
    from benchmarks import common as C
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import ceiling  # type: ignore[no-redef]
    import common as C  # type: ignore[no-redef]
    import compile_check  # type: ignore[no-redef]
    import inference  # type: ignore[no-redef]
    import trainer  # type: ignore[no-redef]
    import training  # type: ignore[no-redef]

#: figure id -> (module, title). Figures 2 and 3 come from one script (same models, same run).
FIGURES = {
    '1': (inference, 'inference overhead'),
    '2': (training, 'training overhead and memory (figures 2 and 3)'),
    '4': (trainer, 'trainer efficiency'),
    '5': (ceiling, 'compute ceiling'),
    'compile': (compile_check, 'graph breaks and scripting'),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--only', nargs='+', choices=tuple(FIGURES), default=list(FIGURES),
                   help='figures to run (2 also gives figure 3); default: all')
    p.add_argument('--smoke', action='store_true', help='each figure in its tiny --smoke configuration')
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--dtype', default='float32', choices=tuple(C.DTYPES))
    p.add_argument('--compile', action='store_true', help='torch.compile the models (figures 1, 2, 5)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch CPU threads (default: 1 on --device cpu, see --clock; torch decides on cuda)')
    p.add_argument('--clock', default=None, choices=tuple(C.CLOCKS),
                   help="how figures 1, 2, 5 are timed (default: 'cpu' on --device cpu, 'wall' on cuda). 'cpu' is "
                        'process CPU time: with one thread it counts the work done, not the time spent waiting for '
                        'a core, so ratios stay meaningful on a shared machine')
    args = p.parse_args(argv)
    on_cpu = args.device == 'cpu'
    args.threads = (1 if on_cpu else 0) if args.threads is None else args.threads
    args.clock = args.clock or ('cpu' if on_cpu else 'wall')
    return args


def figure_argv(key: str, args: argparse.Namespace) -> list[str]:
    if key == 'compile':
        return ['--smoke'] if args.smoke else []
    argv = ['--device', args.device, '--dtype', args.dtype]
    if args.threads:
        argv += ['--threads', str(args.threads)]
    if key != '4':  # the trainer reports wall-clock img/s
        argv += ['--clock', args.clock]
    if args.compile and key != '4':
        argv.append('--compile')
    if args.smoke:
        argv.append('--smoke')
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 0:
        raise SystemExit(f'--threads must be >= 0, got {args.threads}')
    started = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    cmd = ' '.join(['python benchmarks/run_all.py', *(sys.argv[1:] if argv is None else argv)])
    print(f'## Benchmark run, {now}\n\n`{cmd}`\n', flush=True)
    for key in args.only:
        module, title = FIGURES[key]
        t0 = time.perf_counter()
        table, _ = module.run(module.parse_args(figure_argv(key, args)))
        print(f'{table}\n\n_{title}: {time.perf_counter() - t0:.0f} s_\n', flush=True)
    print(f'_total: {time.perf_counter() - started:.0f} s_', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
