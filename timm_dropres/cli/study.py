"""``dropres-study SPEC.yaml``: run a paired dropout study through the trainer, or re-make its report.

    dropres-study my_study.yaml --workers 2 --threads 1     # run (or, with --resume, continue) and report
    dropres-study my_study.yaml --report-only               # re-analyse the committed records
    dropres-study --seeds-for-sd 0.51 --effect 0.5 --family-size 4   # how many seeds resolve 0.5 points
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Sequence

from ..recipes import find_recipe
from ..study.power import minimum_detectable_effect, seeds_needed
from ..study.report import write_study_report
from ..study.runner import StudyError, check_runs, read_records, run_study
from ..study.spec import load_study_spec, plan_runs
from ..training.data import DataError

__all__ = ['main']


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dropres-study', description='Paired dropout A/B study on your data, through '
                                'the dropres-finetune trainer: records per run, tables, a PNG and verdicts.')
    p.add_argument('spec', nargs='?', help='the study YAML (a path, or a shipped recipe name such as '
                   'studies/overfit.yaml)')
    p.add_argument('--workers', type=int, default=1, help='runs side by side, one process each (default 1)')
    p.add_argument('--threads', type=int, default=None, help='torch threads per run (default: torch\'s)')
    p.add_argument('--resume', action='store_true', help='continue a study that has records; finished runs are '
                   'not re-run')
    p.add_argument('--report-only', action='store_true', help='re-make the report from the records; train nothing')
    p.add_argument('--only-arch', nargs='+', default=None, help='run only these architectures')
    p.add_argument('--dry-run', action='store_true', help='list the planned and recorded runs; train nothing')
    p.add_argument('--no-png', action='store_true', help='skip the PNG')
    g = p.add_argument_group('seed calculator (no spec needed)')
    g.add_argument('--seeds-for-sd', type=float, default=None, metavar='SD',
                   help='the measured SD of per-seed differences (top-1 points): print the seeds that resolve '
                   '--effect and the MDE at 5..30 seeds')
    g.add_argument('--effect', type=float, default=0.5, help='effect to resolve (default 0.5 points)')
    g.add_argument('--family-size', type=int, default=1, help='comparisons in the Holm family (default 1)')
    g.add_argument('--alpha', type=float, default=0.05, help='family-wise error rate (default 0.05)')
    g.add_argument('--power', type=float, default=0.8, help='power (default 0.8)')
    return p


def _calculator(args: argparse.Namespace) -> int:
    level = args.alpha / args.family_size
    n = seeds_needed(args.seeds_for_sd, args.effect, level, args.power)
    print(f'SD of per-seed differences {args.seeds_for_sd:g}, alpha {args.alpha:g} / {args.family_size} '
          f'comparisons, power {args.power:.0%}: {n} seeds resolve {args.effect:g}')
    for k in (5, 8, 10, 12, 15, 20, 25, 30):
        mde = minimum_detectable_effect(args.seeds_for_sd, k, level, args.power)
        print(f'  {k:3d} seeds: smallest detectable effect {mde:.3f}')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.seeds_for_sd is not None:
        if args.seeds_for_sd <= 0 or args.effect <= 0 or args.family_size < 1 or not 0 < args.alpha < 1 \
                or not 0 < args.power < 1:
            p.error('--seeds-for-sd and --effect must be > 0, --family-size >= 1, --alpha and --power in (0, 1)')
        return _calculator(args)
    if args.spec is None:
        p.error('give a study spec (YAML), or --seeds-for-sd for the seed calculator')
    if args.workers < 1:
        p.error(f'--workers must be >= 1, got {args.workers}')
    if args.threads is not None and args.threads < 1:
        p.error(f'--threads must be >= 1, got {args.threads}')
    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    command = 'dropres-study ' + ' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        try:
            path = find_recipe(args.spec)
        except FileNotFoundError:
            path = args.spec
        spec = load_study_spec(path)
        planned = plan_runs(spec, args.only_arch)
        if args.dry_run:
            check_runs(spec, planned)  # as run_study does first: says whether the study can run at all
            have = read_records(spec, planned)
            for r in planned:
                print(f'{"recorded" if r.key in have else "to run":>9}  {r.key}')
            print(f'{len(planned)} planned, {len(have)} recorded')
            return 0
        failed = {}
        if not args.report_only:
            result = run_study(spec, workers=args.workers, resume=args.resume, threads=args.threads,
                               only_arch=args.only_arch, log=lambda m: print(m, flush=True))
            failed = result.failed
        records = list(read_records(spec, planned).values())
        paths = write_study_report(spec, records, command=command, planned=len(planned), png=not args.no_png)
    except (StudyError, DataError, FileNotFoundError, ValueError) as e:
        print(f'dropres-study: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM with --workers > 1
        print('dropres-study: interrupted; every finished run is recorded, and a run stopped midway continues from '
              'its last checkpoint: run the same command with --resume', file=sys.stderr)
        return 130
    print(f'{len(records)} of {len(planned)} runs recorded; report: ' + ', '.join(str(p) for p in paths.values()))
    if failed:
        print(f'dropres-study: {len(failed)} run(s) failed: ' + '; '.join(f'{k}: {v}' for k, v in failed.items()),
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
