"""Text tables of the module-test results."""
from __future__ import annotations

from typing import Sequence  # noqa: UP035

from .blocks import BlockResult
from .shift import BNShift, shift_max, shift_mean


def format_shift_table(records: Sequence[BNShift], title: str = '') -> str:
    """Format variance-shift records as a per-layer text table, with the mean/max summary at the bottom.

    Args:
        records: per-layer results of ``variance_shift``.
        title: optional first line.

    Returns:
        The table: one row per layer (shift, worst channel, real and running variance), then mean and max.

    Raises:
        ValueError: if ``records`` is empty.
    """
    width = max([len(r.name) for r in records] + [5])
    lines = [title] if title else []
    lines.append(f'{"BN layer":<{width}}  {"shift":>7}  {"worst ch":>8}  {"real var":>10}  {"running var":>11}')
    lines += [f'{r.name:<{width}}  {r.metric:7.3f}  {r.worst_channel:8.3f}  {r.real_var:10.4g}  {r.running_var:11.4g}'
              for r in records]
    lines.append(f'{"mean":<{width}}  {shift_mean(records):7.3f}')
    lines.append(f'{"max":<{width}}  {shift_max(records):7.3f}')
    return '\n'.join(lines)


def format_block_table(results: Sequence[BlockResult]) -> str:
    """Format module-test results as a text table, with ``-`` where no analytic prediction exists.

    Args:
        results: results of ``residual_block_test``, of one or both forms.

    Returns:
        One row per result (guideline positions marked ``*``) and a legend line.
    """
    def f(v: float | None, fmt: str = '.3f') -> str:
        return '-' if v is None else format(v, fmt)

    lines = [f'{"form":<4}  {"position":<13} {"p":>4}  {"out mean tr/ev":>15}  {"out var tr/ev":>15}  '
             f'{"pred var":>8}  {"consumer BN":<11} {"shift":>6} {"pred":>6} {"closed":>6}  {"next BN":>7}']
    for r in results:
        mark = ' *' if r.guideline else ''
        lines.append(
            f'{r.form:<4}  {r.position + mark:<13} {r.p:4.2f}  {r.out_mean_train:7.3f}/{r.out_mean_eval:<7.3f}  '
            f'{r.out_var_train:7.3f}/{r.out_var_eval:<7.3f}  {f(r.out_var_pred):>8}  {r.consumer:<11} '
            f'{r.consumer_shift:6.3f} {f(r.consumer_shift_pred):>6} {f(r.closed_form):>6}  {r.next_bn_shift:7.3f}')
    lines.append('* = the guideline position (pre: the paper\'s; post: the library default after_last_bn)')
    return '\n'.join(lines)


