"""Reports for the seed-paired dropout studies: per-configuration tables, paired comparisons, CSV and PNG.

Input is a list of run records (one dict per architecture x configuration x seed, as the studies write them
to JSON). Every comparison is paired over seeds (:mod:`timm_dropres.research.stats`): against no dropout for every
configuration, and between the guideline and each wrong position, and between head dropout before and
after pooling. Holm's correction runs over each table's family: one per architecture and metric.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..files import write_text_atomic
from .stats import PairedComparison, apply_holm, paired

__all__ = ['METRICS', 'summarize', 'pair_comparisons', 'markdown_tables', 'overfit_table', 'write_csv', 'plot',
           'write_report', 'KEEP_MARKER']

#: metrics with a mean ± sd column; the first two also get paired comparisons
METRICS = ('top1', 'nll', 'train_nll', 'vs_mean', 'vs_max')
COMPARED = ('top1', 'nll')
_DIGITS = dict(top1=2, nll=4, train_nll=4, vs_mean=3, vs_max=3)
#: the wrong residual positions compared with the guideline's residual-only configuration
WRONG = ('before_last_conv', 'after_last_bn', 'before_every_bn', 'after_add')
#: Text below this line in an existing report is kept when the report is regenerated.
KEEP_MARKER = '<!-- generated above; text below this line is kept when the report is regenerated -->'


def config_order(name: str, order: Sequence[str]) -> Tuple[int, float]:
    """Sort key of a configuration name in reports: its place in ``order``, then its ``@<rate>``.

    Args:
        name: a configuration name, optionally suffixed ``@<rate>`` (e.g. ``'default@0.1'``).
        order: configuration names in report order.

    Returns:
        ``(index, rate)``: the index of the base name in ``order`` (``len(order)`` if absent), and the
        rate (-1.0 without a suffix, so the plain configuration comes before its rate variants).

    Raises:
        ValueError: if the text after ``@`` is not a number.

    Example:
        >>> config_order('default@0.1', ['none', 'default']), config_order('other', ['none', 'default'])
        ((1, 0.1), (2, -1.0))
    """
    base, _, rate = name.partition('@')
    return (order.index(base) if base in order else len(order)), float(rate) if rate else -1.0


def _by_seed(recs: Iterable[Mapping[str, Any]], metric: str) -> Dict[int, float]:
    return {r['seed']: r[metric] for r in recs if r.get(metric) is not None}


def summarize(records: Iterable[Mapping[str, Any]], order: Sequence[str] = (), alpha: float = 0.05
              ) -> List[Dict[str, Any]]:
    """One row per (architecture, configuration): n, mean/sd of every metric, paired difference vs 'none'.

    Args:
        records: run records with at least ``arch``, ``config``, ``seed``, ``top1`` and ``nll``.
        order: configuration names in report order (others follow, by name).
        alpha: family-wise error rate for the Holm-corrected comparisons.

    Returns:
        Rows with ``<metric>_mean``/``_sd``/``_values`` and ``<metric>_vs_none`` (a ``PairedComparison`` or
        None for 'none' itself and for architectures without a 'none' run).
    """
    groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r['arch'], r['config']), []).append(r)
    rows = []
    for (arch, config), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], config_order(kv[0][1], order),
                                                                       kv[0][1])):
        recs = sorted(recs, key=lambda r: r['seed'])
        row: Dict[str, Any] = dict(arch=arch, config=config, n=len(recs), seeds=[r['seed'] for r in recs],
                                   resolved_res_pos=recs[0].get('resolved_res_pos'))
        for m in METRICS:
            vals = [r[m] for r in recs if r.get(m) is not None]
            row[f'{m}_values'] = vals
            row[f'{m}_mean'] = statistics.fmean(vals) if vals else float('nan')
            row[f'{m}_sd'] = statistics.stdev(vals) if len(vals) > 1 else float('nan')
        base = groups.get((arch, 'none'))
        for m in COMPARED:
            row[f'{m}_vs_none'] = (paired(_by_seed(recs, m), _by_seed(base, m), alpha)
                                   if base and config != 'none' else None)
        rows.append(row)
    for arch in {r['arch'] for r in rows}:  # Holm within each architecture's table, per metric
        mine = [r for r in rows if r['arch'] == arch and r['top1_vs_none'] is not None]
        for m in COMPARED:
            for r, c in zip(mine, apply_holm([r[f'{m}_vs_none'] for r in mine]), strict=True):
                r[f'{m}_vs_none'] = c
    return rows


def _residual_reference(configs: Sequence[str], default_pos: Optional[str]) -> Optional[str]:
    """The residual-only configuration at the guideline position: 'residual', or the one named after it."""
    if 'residual' in configs:
        return 'residual'
    return default_pos if default_pos in configs else None


def pair_comparisons(records: Iterable[Mapping[str, Any]], alpha: float = 0.05) -> List[Dict[str, Any]]:
    """Compare the guideline with each wrong placement, paired over seeds, per architecture.

    The pairs are: the guideline's residual-only configuration − each wrong residual position present
    (``'before_last_conv'``, ``'after_last_bn'``, ``'before_every_bn'``, ``'after_add'``), and
    ``'head_before_pool'`` − ``'head_after_pool'``. The guideline's residual-only configuration is
    ``'residual'``, else the configuration named after the position the ``'default'`` run resolved to;
    a configuration is never compared with itself. Holm's correction runs over each architecture's pairs,
    per metric.

    Args:
        records: run records with at least ``arch``, ``config``, ``seed``, ``top1`` and ``nll``.
        alpha: family-wise error rate for the Holm-corrected comparisons.

    Returns:
        One dict per pair, sorted by architecture: ``arch``, ``a``, ``b`` (configuration names) and, for
        ``top1`` and ``nll``, a ``PairedComparison`` of ``a - b`` with ``p_holm`` set.

    Raises:
        ValueError: if the two configurations of a pair share no seed.
    """
    records = list(records)
    out = []
    for arch in sorted({r['arch'] for r in records}):
        recs = [r for r in records if r['arch'] == arch]
        configs = {r['config'] for r in recs}
        default_pos = next((r.get('resolved_res_pos') for r in recs if r['config'] == 'default'), None)
        ref = _residual_reference(sorted(configs), default_pos)
        pairs = [(ref, w) for w in WRONG if ref and w in configs and w != ref]
        if {'head_before_pool', 'head_after_pool'} <= configs:
            pairs.append(('head_before_pool', 'head_after_pool'))
        rows = []
        for a, b in pairs:
            ra = [r for r in recs if r['config'] == a]
            rb = [r for r in recs if r['config'] == b]
            rows.append(dict(arch=arch, a=a, b=b, **{m: paired(_by_seed(ra, m), _by_seed(rb, m), alpha)
                                                     for m in COMPARED}))
        for m in COMPARED:
            for r, c in zip(rows, apply_holm([r[m] for r in rows]), strict=True):
                r[m] = c
        out += rows
    return out


def _fmt(mean: float, sd: float, digits: int) -> str:
    if math.isnan(mean):
        return ''
    return f'{mean:.{digits}f} ± {sd:.{digits}f}' if math.isfinite(sd) else f'{mean:.{digits}f}'


def markdown_tables(records: Sequence[Mapping[str, Any]], order: Sequence[str] = (), alpha: float = 0.05,
                    rows: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Format the results as markdown: per-architecture tables and the pairwise comparisons.

    Each architecture's table has one row per configuration with n, mean ± sd of top-1, test NLL and
    train NLL (and the variance-shift columns when any record has them), and the paired Δ vs ``'none'``
    with its 95 % interval and Holm-corrected p-value. A table of ``pair_comparisons`` follows.

    Args:
        records: run records (see ``summarize``).
        order: configuration names in report order (others follow, by name).
        alpha: family-wise error rate for the Holm-corrected comparisons.
        rows: ``summarize(records, order, alpha)`` when the caller already has it (computed here otherwise).

    Returns:
        The markdown text, starting with a legend of the Δ columns.

    Raises:
        ValueError: if two compared configurations share no seed.
    """
    if rows is None:
        rows = summarize(records, order, alpha)
    has_vs = any(r.get('vs_mean') is not None for r in records)
    lines = [f'Δ columns: mean per-seed difference [95 % t interval] and the paired t-test p-value after Holm '
             f"correction within the table's column; `*` = significant at {alpha:g} after correction. Δ NLL < 0 "
             'is better.', '']
    for arch in sorted({r['arch'] for r in rows}):
        head = ['configuration', 'n', 'top-1 %', 'Δ top-1 vs none', 'test NLL', 'Δ NLL vs none', 'train NLL']
        head += ['VS mean', 'VS max'] if has_vs else []
        lines += [f'### {arch}', '', '| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
        for r in (r for r in rows if r['arch'] == arch):
            name = r['config'] + (f" (→ {r['resolved_res_pos']})" if r['resolved_res_pos']
                                  and r['config'].partition('@')[0] in ('default', 'residual') else '')
            cells = [name, str(r['n'])]
            for m in ('top1', 'nll', 'train_nll') + (('vs_mean', 'vs_max') if has_vs else ()):
                cells.append(_fmt(r[f'{m}_mean'], r[f'{m}_sd'], _DIGITS[m]))
                if m in COMPARED:
                    c: Optional[PairedComparison] = r[f'{m}_vs_none']
                    cells.append('' if c is None else c.mark(2 if m == 'top1' else 4))
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
    pairs = pair_comparisons(records, alpha)
    if pairs:
        lines += ['### Pairwise (paired over seeds; Holm within each architecture)', '',
                  '| arch | a − b | n | Δ top-1 | Δ NLL |', '| --- | --- | --- | --- | --- |']
        for p in pairs:
            lines.append(f"| {p['arch']} | {p['a']} − {p['b']} | {p['top1'].n} | {p['top1'].mark()} | "
                         f"{p['nll'].mark(4)} |")
        lines.append('')
    return '\n'.join(lines)


def overfit_table(records: Sequence[Mapping[str, Any]], config: str = 'none') -> str:
    """Tabulate ``config``'s recorded training curve, to show whether it over-fits (test NLL rising).

    Per architecture: the mean over seeds of the training loss, test NLL and test top-1 at each recorded
    epoch (the epochs of the first seed's curve; a seed with a shorter curve is left out of the later
    means). Records need the ``curve`` field that ``Schedule.curve_every`` produces.

    Args:
        records: run records.
        config: the configuration whose curve is shown.

    Returns:
        Markdown tables, one per architecture with a curve; an empty string if no record has one.
    """
    lines = []
    for arch in sorted({r['arch'] for r in records}):
        recs = [r for r in records if r['arch'] == arch and r['config'] == config and r.get('curve')]
        if not recs:
            continue
        epochs = [p['epoch'] for p in recs[0]['curve']]
        lines += [f'#### {arch}, `{config}`: mean over {len(recs)} seeds', '',
                  '| epoch | ' + ' | '.join(str(e) for e in epochs) + ' |', '|' + ' --- |' * (len(epochs) + 1)]
        for key, label, d in (('train_loss', 'train loss (train mode)', 4), ('test_nll', 'test NLL', 4),
                              ('test_top1', 'test top-1 %', 2)):
            vals = [statistics.fmean(r['curve'][i][key] for r in recs if len(r['curve']) > i)
                    for i in range(len(epochs))]
            lines.append(f'| {label} | ' + ' | '.join(f'{v:.{d}f}' for v in vals) + ' |')
        lines.append('')
    return '\n'.join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write the summary rows as CSV, atomically (via a temporary file and ``os.replace``).

    Columns: ``arch``, ``config``, ``n``, ``resolved_res_pos``, ``<metric>_mean``/``_sd`` for every metric
    of ``METRICS``, and for ``top1``/``nll`` the paired comparison vs none (``_diff_vs_none``,
    ``_ci_low``, ``_ci_high``, ``_p``, ``_p_holm``; empty for ``'none'`` itself).

    Args:
        rows: rows of ``summarize``.
        path: the CSV file to write; its folder must exist.

    Raises:
        OSError: if the file cannot be written.
    """
    cols = ['arch', 'config', 'n', 'resolved_res_pos']
    for m in METRICS:
        cols += [f'{m}_mean', f'{m}_sd']
    for m in COMPARED:
        cols += [f'{m}_diff_vs_none', f'{m}_ci_low', f'{m}_ci_high', f'{m}_p', f'{m}_p_holm']
    tmp = path.with_suffix('.csv.tmp')
    with open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            line = [r['arch'], r['config'], r['n'], r['resolved_res_pos'] or '']
            for m in METRICS:
                line += [f'{r[f"{m}_mean"]:.6g}', f'{r[f"{m}_sd"]:.6g}']
            for m in COMPARED:
                c = r[f'{m}_vs_none']
                line += [''] * 5 if c is None else [f'{c.diff:.6g}', f'{c.ci_low:.6g}', f'{c.ci_high:.6g}',
                                                     f'{c.p:.4g}', f'{c.p_holm:.4g}']
            w.writerow(line)
    os.replace(tmp, path)


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str = '') -> None:
    """Plot Δ top-1 and Δ NLL vs no dropout per configuration, one row of panels per architecture, and save it.

    Each configuration shows its mean paired difference with the 95 % interval (blue where significant
    after Holm, grey otherwise) and small dots for the per-seed differences. The image is written
    atomically (via a temporary file and ``os.replace``).

    Args:
        rows: rows of ``summarize``.
        path: the PNG file to write; its folder must exist.
        title: appended to the figure's footnote.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    archs = sorted({r['arch'] for r in rows})
    n_cfg = max(sum(1 for r in rows if r['arch'] == a) for a in archs)
    fig, axes = plt.subplots(len(archs), 2, figsize=(12, 1.2 + 0.38 * n_cfg * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        rs = [r for r in rows if r['arch'] == arch and r['top1_vs_none'] is not None]
        base = next((r for r in rows if r['arch'] == arch and r['config'] == 'none'), None)
        ys = list(range(len(rs)))[::-1]
        for j, (m, label) in enumerate((('top1', 'Δ top-1 (points)'), ('nll', 'Δ test NLL'))):
            ax = axes[i][j]
            for y, r in zip(ys, rs, strict=True):
                c: PairedComparison = r[f'{m}_vs_none']
                color = 'tab:blue' if c.significant else '0.55'
                if math.isfinite(c.ci_low):
                    ax.plot([c.ci_low, c.ci_high], [y, y], color=color, lw=2)
                ax.plot([c.diff], [y], 'o', color=color, ms=6)
                if base is not None:
                    seeds = dict(zip(base['seeds'], base[f'{m}_values'], strict=True))
                    ds = [v - seeds[s] for s, v in zip(r['seeds'], r[f'{m}_values'], strict=True) if s in seeds]
                    ax.plot(ds, [y + 0.22] * len(ds), '.', color='k', ms=3, alpha=0.6)
            ax.axvline(0.0, color='k', lw=0.8)
            ax.set_yticks(ys)
            ax.set_yticklabels([r['config'] for r in rs] if j == 0 else [], fontsize=8)
            ax.set_title(f'{arch}: {label} vs no dropout', fontsize=9)
    fig.text(0.01, 0.005, 'line: 95 % paired t interval; blue: significant after Holm; small dots: per-seed '
             'differences' + (f' — {title}' if title else ''), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    tmp = path.with_suffix('.tmp.png')
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(
        records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, stem: str, order: Sequence[str] = (),
        alpha: float = 0.05, header: str = '', png: bool = True, curve_config: str = 'none',
) -> Dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` (header, tables, over-fitting curve) and ``<stem>.png``.

    Args:
        records: the run records.
        out_dir: destination folder (created).
        stem: file name stem.
        order: configuration report order.
        alpha: family-wise error rate.
        header: markdown placed above the tables.
        png: also draw the plot (needs matplotlib).
        curve_config: whose recorded curve goes into the over-fitting table.

    Returns:
        The written paths by kind (``csv``, ``md``, ``png``).

    Raises:
        ValueError: if ``records`` is empty.
    """
    if not records:
        raise ValueError('no run records to report')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, order, alpha)
    paths = dict(csv=out / f'{stem}.csv', md=out / f'{stem}.md')
    write_csv(rows, paths['csv'])
    md = (header.rstrip() + '\n\n' if header else '') + markdown_tables(records, order, alpha, rows)
    curve = overfit_table(records, curve_config)
    if curve:
        md += '\n### Over-fitting check (recorded during training)\n\n' + curve
    if paths['md'].is_file():  # keep the hand-written analysis below the marker
        old = paths['md'].read_text()
        if KEEP_MARKER in old:
            md = md.rstrip() + '\n\n' + KEEP_MARKER + old.split(KEEP_MARKER, 1)[1]
    write_text_atomic(paths['md'], md)
    if png:
        paths['png'] = out / f'{stem}.png'
        plot(rows, paths['png'])
    return paths
