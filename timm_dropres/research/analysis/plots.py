"""Figures of the module-test results (matplotlib, an optional dependency: the ``plot`` extra)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence  # noqa: UP035

from .blocks import BlockResult
from .head import HeadResult
from .shift import BNShift, shift_max, shift_mean

# ----------------------------------------------------------------------------------------------------------
# plots (matplotlib, optional dependency: the 'plot' extra)
# ----------------------------------------------------------------------------------------------------------

def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'timm-dropres[plot]'") from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_shift(results: Dict[str, List[BNShift]], path: str, title: str = '') -> str:
    """Plot the variance shift of every BN layer in forward order, one line per position, and save it.

    Args:
        results: ``{label: per-BN records}``, e.g. the output of ``shift_by_position``.
        path: image file to write (format from its extension).
        title: plot title (default: ``'variance shift per BN layer'``).

    Returns:
        ``path``.

    Raises:
        ImportError: if matplotlib is not installed (the ``plot`` extra).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for pos, recs in results.items():
        ax.plot(range(len(recs)), [r.metric for r in recs], marker='o', ms=3,
                label=f'{pos} (mean {shift_mean(recs):.3f}, max {shift_max(recs):.3f})')
    ax.axhline(1.0, color='grey', lw=0.8)
    ax.set_xlabel('BN layer (forward order)')
    ax.set_ylabel('variance shift  max(real/running, running/real)')
    ax.set_title(title or 'variance shift per BN layer')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_block(results: Sequence[BlockResult], path: str) -> str:
    """Plot the module-test results, one panel per block form, and save the figure.

    Bars: measured shift at the consuming BN and at the next block's BN per position; black x: the
    analytic prediction at the consuming BN, where one exists.

    Args:
        results: results of ``residual_block_test``.
        path: image file to write (format from its extension).

    Returns:
        ``path``.

    Raises:
        ImportError: if matplotlib is not installed (the ``plot`` extra).
    """
    plt = _pyplot()
    forms = sorted({r.form for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(forms), figsize=(6 * len(forms), 4), squeeze=False)
    for ax, form in zip(axes[0], forms, strict=True):
        rs = [r for r in results if r.form == form]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r.consumer_shift for r in rs], 0.4, label='consuming BN (measured)')
        ax.bar([x + 0.2 for x in xs], [r.next_bn_shift for r in rs], 0.4, label="next block's BN (measured)")
        pred = [(x - 0.2, r.consumer_shift_pred) for x, r in zip(xs, rs, strict=True) if r.consumer_shift_pred]
        if pred:
            ax.scatter(*zip(*pred, strict=True), color='k', marker='x', zorder=3, label='analytic')
        ax.set_xticks(list(xs), [r.position + (' *' if r.guideline else '') for r in rs], rotation=30, ha='right')
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.set_title(f'{form}-activation block, p = {max(r.p for r in rs):g} (* = guideline)')
        ax.set_ylabel('variance shift')
        ax.legend(fontsize=8, loc='upper left')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_head(sweep: Sequence[HeadResult], path: str, real: HeadResult | None = None, label: str = '') -> str:
    """Plot the head-test variance ratio (before / after pooling) against H*W on log-log axes, and save it.

    The measured ratios are drawn with the exact prediction and ``1 / (H*W)``.

    Args:
        sweep: results of ``iid_head_sweep``.
        path: image file to write (format from its extension).
        real: optional result on a real model's feature maps (``head_test_on_model``), drawn as one point.
        label: legend text for ``real``.

    Returns:
        ``path``.

    Raises:
        ImportError: if matplotlib is not installed (the ``plot`` extra).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    hw = [r.hw for r in sweep]
    ax.plot(hw, [r.ratio for r in sweep], 'o', label='measured, independent positions')
    ax.plot(hw, [r.ratio_pred for r in sweep], 'x', color='k', label='exact prediction')
    ax.plot(hw, [1.0 / h for h in hw], '--', color='grey', label='1 / (H*W)')
    if real is not None:
        ax.plot([real.hw], [real.ratio], 's', color='C3', label=f'real feature maps {label}'.strip())
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('H * W')
    ax.set_ylabel('var(dropout before pool) / var(after pool)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
