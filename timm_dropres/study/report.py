"""A study's report from its records alone: paired comparisons, power, verdicts in words, CSV, markdown and PNG.

Per comparison ``a - b`` (paired over the seeds both ran; :func:`timm_dropres.research.stats.paired`): the mean
difference, its 95 % t interval (**not** adjusted for multiplicity; the table says so), the paired t-test's
p-value and Holm's adjustment within the family (per architecture and metric;
:func:`timm_dropres.research.stats.apply_holm`), the minimum detectable effect at the spec's power for the seeds
used (at Holm's strictest level, ``alpha / m``; :mod:`timm_dropres.study.power`), the seeds that would resolve
the spec's ``effect``, and a verdict that says only what the test supports: "better", "worse", or "not resolved:
smallest detectable effect x".
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..files import write_text_atomic
from ..research.report import KEEP_MARKER
from ..research.stats import PairedComparison, apply_holm, paired
from .power import minimum_detectable_effect, seeds_needed
from .spec import StudySpec

__all__ = ['METRICS', 'Comparison', 'compare', 'verdict', 'summary_rows', 'markdown', 'write_csv', 'plot',
           'write_study_report']

#: compared metrics: (record key, label, unit, higher is better, digits)
METRICS = (('top1', 'top-1', 'points', True, 2), ('nll', 'test NLL', '', False, 4), ('ece', 'ECE', '', False, 4))
_SUMMARY = (('top1', 'top-1 %', 2), ('top5', 'top-5 %', 2), ('nll', 'test NLL', 4), ('ece', 'ECE', 4),
            ('train_nll', 'train NLL (eval)', 4), ('vs_mean', 'VS mean', 3), ('vs_max', 'VS max', 3))


@dataclass
class Comparison:
    """One ``a - b`` comparison of one metric on one architecture, with its power and verdict."""

    arch: str
    family: str
    a: str
    b: str
    metric: str
    stats: PairedComparison
    family_size: int
    sd: float
    mde: float
    seeds_for_effect: Optional[int]
    verdict: str
    diffs: Dict[int, float]


def verdict(c: PairedComparison, mde: float, higher_is_better: bool, unit: str = '', digits: int = 2) -> str:
    """The comparison in words, as far as the test supports: better, worse, or not resolved.

    Example:
        >>> from timm_dropres.research.stats import paired, apply_holm
        >>> c = apply_holm([paired({0: 1.0, 1: 1.2, 2: 0.9}, {0: 1.1, 1: 1.0, 2: 1.0})])[0]
        >>> verdict(c, 0.93, True, 'points')
        'not resolved: smallest detectable effect 0.93 points'
    """
    if c.significant:
        return 'better' if (c.diff > 0) == higher_is_better else 'worse'
    if c.n < 2:
        return f'not resolved: {c.n} paired seed(s)'
    if not math.isfinite(mde):
        return 'not resolved: identical on every seed'
    return f'not resolved: smallest detectable effect {mde:.{digits}f}' + (f' {unit}' if unit else '')


def _by_seed(records: Sequence[Mapping[str, Any]], arch: str, config: str, metric: str) -> Dict[int, float]:
    return {r['seed']: r[metric] for r in records if r['arch'] == arch and r['config'] == config
            and r.get(metric) is not None}


def compare(spec: StudySpec, records: Sequence[Mapping[str, Any]]) -> List[Comparison]:
    """Every comparison of the spec's families, per architecture and metric, Holm-adjusted within each family.

    Comparisons whose two configurations share no recorded seed are left out (a study still running).
    """
    out: List[Comparison] = []
    archs = [a.name for a in spec.architectures if any(r['arch'] == a.name for r in records)]
    for arch in archs:
        for family, pairs in spec.comparisons.items():
            for metric, _, unit, higher, digits in METRICS:
                rows = []
                for a, b in pairs:
                    xa, xb = _by_seed(records, arch, a, metric), _by_seed(records, arch, b, metric)
                    common = sorted(set(xa) & set(xb))
                    if common:
                        rows.append((a, b, paired(xa, xb, spec.alpha), {s: xa[s] - xb[s] for s in common}))
                adjusted = apply_holm([r[2] for r in rows])
                m = len(rows)
                for (a, b, _, diffs), c in zip(rows, adjusted, strict=True):
                    sd = statistics.stdev(diffs.values()) if len(diffs) > 1 else float('nan')
                    level = spec.alpha / max(m, 1)
                    mde = minimum_detectable_effect(sd, c.n, level, spec.power)
                    need = None
                    if metric == 'top1' and sd > 0 and math.isfinite(sd):
                        try:
                            need = seeds_needed(sd, spec.effect, level, spec.power)
                        except ValueError:
                            need = None
                    out.append(Comparison(arch, family, a, b, metric, c, m, sd, mde, need,
                                          verdict(c, mde, higher, unit, digits), diffs))
    return out


def summary_rows(spec: StudySpec, records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (architecture, configuration): seeds, mean ± sd of every summary metric."""
    rows = []
    for arch in spec.architectures:
        for cfg in spec.configs:
            recs = [r for r in records if r['arch'] == arch.name and r['config'] == cfg.name]
            if not recs:
                continue
            row: Dict[str, Any] = dict(arch=arch.name, config=cfg.name, n=len(recs),
                                       resolved_res_pos=recs[0].get('resolved_res_pos'))
            for key, _, _ in _SUMMARY:
                vals = [r[key] for r in recs if r.get(key) is not None]
                row[f'{key}_mean'] = statistics.fmean(vals) if vals else float('nan')
                row[f'{key}_sd'] = statistics.stdev(vals) if len(vals) > 1 else float('nan')
            rows.append(row)
    return rows


def _ms(mean: float, sd: float, d: int) -> str:
    if math.isnan(mean):
        return ''
    return f'{mean:.{d}f} ± {sd:.{d}f}' if math.isfinite(sd) else f'{mean:.{d}f}'


def _p(p: Optional[float]) -> str:
    if p is None or math.isnan(p):
        return '–'
    return f'{p:.2g}' if p < 0.01 else f'{p:.2f}'


def _ci(c: PairedComparison, d: int) -> str:
    if c.n < 2 or math.isnan(c.ci_low):
        return f'{c.diff:+.{d}f}'
    return f'{c.diff:+.{d}f} [{c.ci_low:+.{d}f}, {c.ci_high:+.{d}f}]'


def markdown(spec: StudySpec, records: Sequence[Mapping[str, Any]], comparisons: Sequence[Comparison]) -> str:
    """The report's tables: per architecture the configurations, then each family's comparisons."""
    digits = {m: d for m, _, _, _, d in METRICS}
    lines = [
        f'Intervals: 95 % paired t intervals, **not adjusted for multiplicity**. p: two-sided paired t-test; '
        f'p (Holm): adjusted within each family, architecture and metric; a verdict is "better" or "worse" only '
        f'when p (Holm) < {spec.alpha:g}. MDE: the smallest true difference the test detects with '
        f'{spec.power:.0%} power at the seeds used, at level alpha / m (m comparisons in the family: Holm\'s '
        f'strictest step). Seeds for ±{spec.effect:g}: the seeds that would resolve a {spec.effect:g}-point top-1 '
        f'difference with that power, from the measured SD of the per-seed differences. ECE: 15 equal-width bins. '
        'NLL and ECE: lower is better.', '']
    rows = summary_rows(spec, records)
    for arch in [a for a in spec.architectures if any(r['arch'] == a.name for r in rows)]:
        lines += [f'### {arch.name}', '']
        if arch.label:
            lines += [arch.label, '']
        for name, why in arch.skip_configs.items():
            lines += [f'- `{name}` not run on {arch.name}: {why}']
        if arch.skip_configs:
            lines.append('')
        head = ['configuration', 'n'] + [label for _, label, _ in _SUMMARY]
        lines += ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
        for r in (r for r in rows if r['arch'] == arch.name):
            pos = r['resolved_res_pos']
            name = r['config'] + (f' (→ {pos})' if pos and pos != r['config'] else '')
            lines.append('| ' + ' | '.join([name, str(r['n'])] + [_ms(r[f'{k}_mean'], r[f'{k}_sd'], d)
                                                                  for k, _, d in _SUMMARY]) + ' |')
        lines.append('')
        for family in spec.comparisons:
            cs = [c for c in comparisons if c.arch == arch.name and c.family == family]
            if not cs:
                continue
            lines += [f'#### {arch.name}: {family}', '',
                      f'| a − b | n | Δ top-1 [95 % CI, unadjusted] | p | p (Holm, m = {cs[0].family_size}) | '
                      f'SD of Δ | MDE | seeds for ±{spec.effect:g} | verdict top-1 | Δ NLL | verdict NLL | '
                      'Δ ECE | verdict ECE |',
                      '|' + ' --- |' * 13]
            pairs = list(dict.fromkeys((c.a, c.b) for c in cs))
            for a, b in pairs:
                by = {c.metric: c for c in cs if (c.a, c.b) == (a, b)}
                t = by['top1']
                cells = [f'{a} − {b}', str(t.stats.n), _ci(t.stats, 2), _p(t.stats.p), _p(t.stats.p_holm),
                         f'{t.sd:.2f}' if math.isfinite(t.sd) else '–',
                         f'{t.mde:.2f}' if math.isfinite(t.mde) else '–',
                         str(t.seeds_for_effect) if t.seeds_for_effect else '–', t.verdict]
                for m in ('nll', 'ece'):
                    c = by.get(m)
                    cells += ['', ''] if c is None else [
                        f'{_ci(c.stats, digits[m])} p (Holm) {_p(c.stats.p_holm)}', c.verdict]
                lines.append('| ' + ' | '.join(cells) + ' |')
            lines.append('')
    return '\n'.join(lines)


def write_csv(comparisons: Sequence[Comparison], path: Path) -> None:
    """One row per comparison and metric, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['arch', 'family', 'a', 'b', 'metric', 'n', 'diff', 'sd_diff', 'ci_low', 'ci_high', 'p', 'p_holm',
                'family_size', 'mde', 'seeds_for_effect', 'verdict'])
    for c in comparisons:
        s = c.stats
        w.writerow([c.arch, c.family, c.a, c.b, c.metric, s.n, f'{s.diff:.6g}', f'{c.sd:.6g}', f'{s.ci_low:.6g}',
                    f'{s.ci_high:.6g}', f'{s.p:.4g}', f'{s.p_holm:.4g}' if s.p_holm is not None else '',
                    c.family_size, f'{c.mde:.6g}', c.seeds_for_effect or '', c.verdict])
    write_text_atomic(path, buf.getvalue())


def plot(comparisons: Sequence[Comparison], path: Path, title: str = '') -> None:
    """Δ top-1 and Δ NLL per comparison: the mean with its 95 % interval and one dot per seed; written atomically.

    A comparison is blue when the verdict is "better", red when "worse", grey when not resolved.
    """
    import os

    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(c.arch for c in comparisons))
    metrics = (('top1', 'Δ top-1 (points)'), ('nll', 'Δ test NLL'))
    n_rows = max(len({(c.family, c.a, c.b) for c in comparisons if c.arch == a}) for a in archs)
    fig, axes = plt.subplots(len(archs), 2, figsize=(12, 1.3 + 0.42 * n_rows * len(archs)), squeeze=False)
    colors = dict(better='tab:blue', worse='tab:red')
    for i, arch in enumerate(archs):
        keys = list(dict.fromkeys((c.family, c.a, c.b) for c in comparisons if c.arch == arch))
        ys = list(range(len(keys)))[::-1]
        for j, (m, label) in enumerate(metrics):
            ax = axes[i][j]
            for y, key in zip(ys, keys, strict=True):
                c = next((c for c in comparisons if c.arch == arch and (c.family, c.a, c.b) == key
                          and c.metric == m), None)
                if c is None:
                    continue
                color = colors.get(c.verdict, '0.55')
                if math.isfinite(c.stats.ci_low):
                    ax.plot([c.stats.ci_low, c.stats.ci_high], [y, y], color=color, lw=2)
                ax.plot([c.stats.diff], [y], 'o', color=color, ms=6)
                ax.plot(list(c.diffs.values()), [y + 0.22] * len(c.diffs), '.', color='k', ms=3, alpha=0.6)
            ax.axvline(0.0, color='k', lw=0.8)
            ax.set_yticks(ys)
            ax.set_yticklabels([f'{a} − {b}' for _, a, b in keys] if j == 0 else [], fontsize=8)
            ax.set_title(f'{arch}: {label}', fontsize=9)
    fig.text(0.01, 0.005, 'line: 95 % paired t interval (unadjusted); dot: mean; small dots: one per seed; blue: '
             'better, red: worse (Holm), grey: not resolved' + (f' — {title}' if title else ''), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    tmp = path.with_suffix('.tmp.png')
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_study_report(spec: StudySpec, records: Sequence[Mapping[str, Any]], *, command: str = '',
                       planned: Optional[int] = None, png: bool = True) -> Dict[str, Path]:
    """Write ``<out_dir>/<name>.md``, ``.csv`` and ``.png`` from the records.

    Text below :data:`timm_dropres.research.report.KEEP_MARKER` in an existing report is kept.

    Args:
        spec: the study.
        records: its run records.
        command: the command line that made the records, for the header.
        planned: the number of planned runs (the header says how many are recorded of them).
        png: also draw the PNG (needs matplotlib).

    Returns:
        The written paths by kind.

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError(f'study {spec.name}: no run records in {spec.resolved_out_dir() / "records"} to report on')
    out = spec.resolved_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    comps = compare(spec, records)
    wall = sum(r.get('wall_s') or 0 for r in records)
    cpu = sum(r.get('cpu_s') or 0 for r in records)
    v = records[0].get('versions') or {}
    devices = sorted({str(r.get('device')) for r in records})
    machines = sorted({str(r.get('machine')) for r in records})
    head = [f'# {spec.title or "Study " + spec.name}', '']
    if spec.header:
        head += [spec.header.strip(), '']
    head += [
        f'- command: `{command}`' if command else f'- spec: study `{spec.name}`',
        f'- records: {len(records)}' + (f' of {planned} planned' if planned is not None else '') +
        f' (`{out / "records"}`); sum of per-run wall times {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min; '
        f'device {", ".join(devices)}, {", ".join(machines)}; torch {v.get("torch", "?")}, timm {v.get("timm", "?")}',
        f'- data: {records[0]["data"].get("description", "")}',
        f'- tested weights: the {spec.select} epoch\'s (chosen on validation only); the test split is read once per '
        'run, after training',
        '- pairing: every configuration of a seed starts from the same initial weights and sees the same data order '
        'and augmentation (the trainer seeds them from the run seed)', '']
    md = '\n'.join(head) + '\n' + markdown(spec, records, comps)
    paths = dict(md=out / f'{spec.name}.md', csv=out / f'{spec.name}.csv')
    if paths['md'].is_file():
        old = paths['md'].read_text()
        if KEEP_MARKER in old:
            md = md.rstrip() + '\n\n' + KEEP_MARKER + old.split(KEEP_MARKER, 1)[1]
    write_text_atomic(paths['md'], md.rstrip() + '\n')
    write_csv(comps, paths['csv'])
    if png and comps:
        paths['png'] = out / f'{spec.name}.png'
        plot(comps, paths['png'], spec.title)
    return paths
