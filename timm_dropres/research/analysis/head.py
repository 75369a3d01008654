"""The head module test: dropout before vs after global average pooling, on real or i.i.d. feature maps."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Sequence, Tuple  # noqa: UP035

import torch
import torch.nn as nn

from ...models.layers import check_rate
from .shift import _device, _first, _mode

# ----------------------------------------------------------------------------------------------------------
# head module test
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadResult:
    """Variance over dropout masks of pooled features (and logits) with dropout before vs after pooling.

    ``*_var_*`` are means over samples and units of the per-unit variance across masks. ``ratio`` is
    before / after. ``ratio_pred`` is the exact expectation given the feature maps,
    ``sum_hw a**2 / (sum_hw a)**2`` averaged as the variances are; ``ratio_iid`` is ``1 / (H * W)``, which
    it equals when every position carries the same value and approaches for independent positions with
    small spread (it is ``(1 + CV**2) / (H * W)`` in general).

    Attributes:
        p: the drop probability.
        n_masks: number of dropout masks drawn.
        hw: ``H * W`` of the feature maps.
        pooled_var_before: variance of the pooled features with dropout on the feature map, before pooling.
        pooled_var_after: variance of the pooled features with dropout after pooling.
        ratio: ``pooled_var_before / pooled_var_after``.
        ratio_pred: the exact expectation of ``ratio`` given the feature maps.
        ratio_iid: ``1 / (H * W)``.
        logit_ratio: the same ratio for the logits; None without a linear classifier.
        logit_ratio_pred: its exact expectation; None without a linear classifier.
    """

    p: float
    n_masks: int
    hw: int
    pooled_var_before: float
    pooled_var_after: float
    ratio: float
    ratio_pred: float
    ratio_iid: float
    logit_ratio: float | None
    logit_ratio_pred: float | None

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain, JSON-serialisable dict."""
        return asdict(self)


def _classifier_weight(fc: nn.Module | None) -> torch.Tensor | None:
    """``[K, C]`` weight of a linear classifier (``nn.Linear`` or a 1x1 conv, as in ResNetV2), else None."""
    if isinstance(fc, nn.Linear) or (isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1):
        return fc.weight.detach().double().cpu().flatten(1)
    return None


@torch.no_grad()
def head_variance_test(
        features: torch.Tensor,
        *,
        p: float = 0.3,
        n_masks: int = 200,
        fc: nn.Module | None = None,
        seed: int = 0,
) -> HeadResult:
    """Compare dropout before vs after global average pooling on ``features``, over random masks.

    Dropout on the feature map before pooling averages ``H * W`` independent masks per channel, so the
    pooled features vary far less across masks than with one mask after pooling. This measures both
    variances (float64, on CPU) over ``n_masks`` masks and compares them with the exact expectation.

    Args:
        features: final feature maps ``[N, C, H, W]``.
        p: drop probability, in (0, 1).
        n_masks: number of masks drawn (at least 2).
        fc: an ``nn.Linear`` or 1x1 conv classifier, to also measure the logit variances; other heads are
            ignored.
        seed: seed of a private mask generator.

    Returns:
        The measured and predicted variances and ratios.

    Raises:
        ValueError: if ``p`` is not in (0, 1), ``features`` is not 4-D, or ``n_masks`` is below 2.

    Example:
        >>> import torch
        >>> r = head_variance_test(torch.ones(2, 4, 4, 4), p=0.3, n_masks=50)
        >>> r.hw, round(r.ratio_pred, 4), r.ratio_iid
        (16, 0.0625, 0.0625)
    """
    p = check_rate('p', p)
    if p == 0.0:
        raise ValueError('p must be > 0 for the head test: with p = 0 both variances are zero')
    if features.dim() != 4:
        raise ValueError(f'features must be [N, C, H, W], got shape {tuple(features.shape)}')
    if n_masks < 2:
        raise ValueError(f'n_masks must be >= 2, got {n_masks}')
    f = features.detach().double().cpu()
    hw = f.shape[2] * f.shape[3]
    w = _classifier_weight(fc)
    gen = torch.Generator().manual_seed(seed)
    q = 1.0 - p
    sums: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    pooled = f.mean(dim=(2, 3))
    for _ in range(n_masks):
        mask_map = (torch.rand(f.shape, generator=gen, dtype=torch.float64) < q).double() / q
        mask_vec = (torch.rand(pooled.shape, generator=gen, dtype=torch.float64) < q).double() / q
        before = (f * mask_map).mean(dim=(2, 3))
        after = pooled * mask_vec
        outs = {'pb': before, 'pa': after}
        if w is not None:
            outs['lb'], outs['la'] = before @ w.t(), after @ w.t()
        for k, v in outs.items():
            s1, s2 = sums.get(k, (torch.zeros_like(v), torch.zeros_like(v)))
            sums[k] = (s1 + v, s2 + v * v)

    def var(k: str) -> float:
        s1, s2 = sums[k]
        m = s1 / n_masks
        return float(((s2 / n_masks - m * m) * n_masks / (n_masks - 1)).mean())

    noise = (1.0 - q) / q
    s_before = (f * f).sum(dim=(2, 3)) / hw ** 2                 # [N, C]: E-variance factor before pooling
    s_after = pooled * pooled                                    # [N, C]
    ratio_pred = float((noise * s_before).mean() / (noise * s_after).mean())
    logit_ratio = logit_pred = None
    if w is not None:
        logit_ratio = var('lb') / var('la')
        logit_pred = float((s_before @ (w * w).t()).mean() / (s_after @ (w * w).t()).mean())
    vb, va = var('pb'), var('pa')
    return HeadResult(p=p, n_masks=n_masks, hw=hw, pooled_var_before=vb, pooled_var_after=va, ratio=vb / va,
                      ratio_pred=ratio_pred, ratio_iid=1.0 / hw, logit_ratio=logit_ratio,
                      logit_ratio_pred=logit_pred)


@torch.no_grad()
def head_test_on_model(
        model: nn.Module, batches: Iterable[Any], *, p: float = 0.3, n_masks: int = 100, seed: int = 0,
) -> HeadResult:
    """Run the head test on a model's real final feature maps (``forward_features``, eval mode) and classifier.

    Args:
        model: a model with ``forward_features`` returning ``[N, C, H, W]`` maps; its ``get_classifier()``
            (if any) is used for the logit variances when it is linear.
        batches: input batches (tensors, ``(input, target, ...)`` tuples/lists, or dicts with
            ``'pixel_values'``).
        p: drop probability, in (0, 1).
        n_masks: number of masks drawn (at least 2).
        seed: seed of the mask generator.

    Returns:
        The head test on the concatenated feature maps of all batches.

    Raises:
        TypeError: if the model has no ``forward_features``, or a batch is none of the accepted forms.
        ValueError: if the features are not 4-D, ``p`` is not in (0, 1), or ``n_masks`` is below 2.
    """
    if not hasattr(model, 'forward_features'):
        raise TypeError(f'{type(model).__name__} has no forward_features(); pass feature maps to head_variance_test')
    device = _device(model)
    with _mode(model, False):
        feats = torch.cat([model.forward_features(_first(b).to(device)).float().cpu() for b in batches])
    fc = model.get_classifier() if hasattr(model, 'get_classifier') else None
    return head_variance_test(feats, p=p, n_masks=n_masks, fc=fc, seed=seed)


def iid_head_sweep(
        sizes: Sequence[int] = (1, 2, 4, 8), *, p: float = 0.3, n: int = 16, channels: int = 32, n_masks: int = 200,
        mean: float = 1.0, std: float = 0.25, seed: int = 0,
) -> List[HeadResult]:
    """Run the head test on synthetic maps with independent positions, for each map size.

    Each map is ``|N(mean, std**2)|`` per element (non-negative, like post-ReLU features), so the measured
    ratio approaches ``1 / (H * W)`` for small ``std / mean``.

    Args:
        sizes: ``H = W`` of the maps, one test each.
        p: drop probability, in (0, 1).
        n: samples per map batch.
        channels: channels of the maps.
        n_masks: masks per test (at least 2).
        mean: mean of the Gaussian before the absolute value.
        std: standard deviation of the Gaussian before the absolute value.
        seed: seed of the maps and the masks.

    Returns:
        One ``HeadResult`` per size, in the order of ``sizes``.

    Raises:
        ValueError: if ``p`` is not in (0, 1) or ``n_masks`` is below 2.

    Example:
        >>> [r.hw for r in iid_head_sweep((1, 2, 4), n_masks=20)]
        [1, 4, 16]
    """
    g = torch.Generator().manual_seed(seed)
    return [head_variance_test((torch.randn(n, channels, s, s, generator=g) * std + mean).abs(), p=p,
                               n_masks=n_masks, seed=seed) for s in sizes]


