"""The audit as text: the table, the ``p`` cell and the rules (``--explain``)."""
from __future__ import annotations

from .vocabulary import HAZARD, LOCATIONS, OFF, OK, TABLE_COLUMNS, TERMS, VERDICTS, AuditReport


def format_p(p: float | None) -> str:
    """The table's ``p`` cell.

    Args:
        p: a drop probability, or ``None`` when it could not be read.

    Returns:
        ``p`` in ``%g`` format, or ``'?'``.
    """
    return '?' if p is None else f'{p:g}'


def format_report(report: AuditReport, *, verbose: bool = False) -> str:
    """The audit as a text table, one row per dropout-like op, with a one-line summary.

    Args:
        report: what :func:`audit` returned.
        verbose: show the downstream path next to the note.

    Returns:
        The table; its columns are :data:`TABLE_COLUMNS`, the same keys ``--json`` writes.
    """
    head = f'{report.model}: {len(report.entries)} dropout-like op(s), traced on input {tuple(report.input_shape)}'
    if not report.entries:
        return head + '\nno dropout-like op ran: nothing to audit'
    rows = [tuple(title for _, title in TABLE_COLUMNS)]
    for e in report.entries:
        why = f'{e.note}; path: {e.path}' if verbose and e.note else e.why
        p = format_p(e.p) if e.active else f'{format_p(e.p)} (inactive)'
        rows.append((str(e.index), e.op, e.name, p, e.location, e.verdict, why))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = [head]
    for r in rows:
        lines.append('  '.join(f'{v:<{w}}' for v, w in zip(r[:-1], widths, strict=True)) + '  ' + r[-1])
    if not report.has_bn:
        lines.append('no BatchNorm with running statistics ran: variance shift cannot occur in this model')
    counts = report.summary()
    lines.append(f'summary: {counts[OK]} {OK}, {counts[HAZARD]} {HAZARD}, {counts[OFF]} {OFF} (active ops only)')
    return '\n'.join(lines)


def describe_rules() -> str:
    """The verdicts, locations and terms as text (the CLI's ``--help`` epilog shows it).

    Returns:
        One line per verdict, location (in the order they are tested) and term, with its rule.
    """
    lines = ['verdicts:']
    lines += [f'  {k}: {v}' for k, v in VERDICTS.items()]
    lines.append('locations (tested in this order):')
    lines += [f'  {k}: {v}' for k, v in LOCATIONS.items()]
    lines.append('terms:')
    lines += [f'  {k}: {v}' for k, v in TERMS.items()]
    return '\n'.join(lines)
