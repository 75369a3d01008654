"""Summarise the JSON lines of a benchmark session (``--json FILE`` of every script) as one JSON document.

``gpu_check.sh`` passes ``--json`` to each figure and calls this at the end, writing
``docs/results/gpu/<date>.json``. The summary keeps, per architecture and layout, the train-step ratio
(dropres / base: median, min-max and the median's confidence interval over paired repetitions) and the
peak-memory ratio, eager and compiled, next to the device and versions; the trainer figure, the kernel
comparison (``dropout_impl.py``) and the other figures' records are kept as they came. Runs that failed or
were skipped left no line, so their entries are simply absent (the markdown output names them).

    python benchmarks/gpu_summary.py session.jsonl --out docs/results/gpu/2026-12-05.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

#: the summary's format; bump when its keys change
SCHEMA = 2


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a line that is not JSON raises ``ValueError`` naming its number."""
    runs = []
    for i, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{i} is not a JSON line ({e.msg})') from e
    return runs


def summarize(runs: list[dict[str, Any]], *, command: str = '', date: str | None = None) -> dict[str, Any]:
    """One document from the runs of a session (see the module docstring for its keys).

    Args:
        runs: what ``read_lines`` returns, in the order the figures ran.
        command: the command that produced them, recorded as given.
        date: ISO date of the session (default: today, UTC).

    Returns:
        ``{schema, date, command, environment, training, kernels, trainer, other}``; ``training`` maps
        ``arch -> layout -> {mode -> {step_ratio, step_seconds, memory_ratio, batch, ...}}`` (``step_ratio``:
        ``{median, lo, hi, ci_lo, ci_hi, ci_level}``; ``step_seconds``: every repetition, per side), where
        ``mode`` is ``eager`` or ``compiled``, followed by `` (<kernel>)`` when the run forced a dropout kernel
        other than ``auto`` (``TIMM_DROPRES_DROPOUT_KERNEL``), e.g. ``compiled (triton)``.
    """
    training: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    kernels: list[dict[str, Any]] = []
    trainer: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    environment = runs[0]['environment'] if runs else {}
    for run in runs:
        script, args = run['script'], run['args']
        if script == 'training':
            mode = 'compiled' if args.get('compile') else 'eager'
            kernel = run.get('environment', {}).get('dropout_kernel', 'auto')
            mode += '' if kernel == 'auto' else f' ({kernel})'
            for r in run['records']:
                entry = training.setdefault(r['arch'], {}).setdefault(r['layout'], {}).setdefault(mode, {})
                entry.update(dtype=args.get('dtype'), img_size=args.get('img_size'),
                             res_drop_rate=args.get('res_drop_rate'))
                if r['figure'] == 2:
                    entry.update(batch=r['batch'], step_ratio=r['ratio'], base_img_per_s=r['base'],
                                 dropres_img_per_s=r['dropres'], step_seconds=r.get('seconds'))
                else:
                    entry.update(memory_batch=r['batch'], memory_ratio=r['ratio'], base_peak_bytes=r['base'],
                                 dropres_peak_bytes=r['dropres'], activation_memory_ratio=r['activation_ratio'])
        elif script == 'dropout_impl':
            kernels.append(dict(args=_short(args), records=run['records']))
        elif script == 'trainer':
            trainer.append(dict(args=_short(args), records=run['records']))
        else:
            other.append(dict(script=script, args=_short(args), records=run['records']))
    return dict(schema=SCHEMA, date=date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                command=command, environment=environment, training=training, kernels=kernels, trainer=trainer,
                other=other)


def _short(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in ('json', 'smoke')}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('jsonl', type=Path, help='the JSON lines the figures appended (--json FILE)')
    p.add_argument('--out', type=Path, required=True, help='where to write the summary (parents are created)')
    p.add_argument('--command', default='', help='the command that ran the session, recorded in the summary')
    args = p.parse_args(argv)
    if not args.jsonl.is_file():
        p.error(f'{args.jsonl} does not exist: no figure wrote a line (did every one fail?)')
    try:
        summary = summarize(read_lines(args.jsonl), command=args.command)
    except ValueError as e:
        p.error(str(e))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + '.tmp')
    tmp.write_text(json.dumps(summary, indent=1) + '\n', encoding='utf-8')
    tmp.replace(args.out)  # atomic: a reader never sees half a file
    print(f'wrote {args.out} ({len(summary["training"])} archs, {len(summary["kernels"])} kernel runs, '
          f'{len(summary["trainer"])} trainer runs)', file=sys.stderr)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
