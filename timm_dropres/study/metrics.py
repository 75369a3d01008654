"""What a study measures on a split after training: top-1, top-5, NLL and ECE, and the BN variance shift.

The trainer's :func:`timm_dropres.training.evaluate.evaluate` gives top-1, top-5 and the loss; a study also
needs the expected calibration error, which needs the predicted probabilities, so the logits are collected
here (inference only) and every metric is computed from them. The variance shift (the paper's mechanism: how
far each BN's eval-mode input variance is from the running variance it normalises with) is measured with
:func:`timm_dropres.research.analysis.variance_shift`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..research.analysis import shift_max, shift_mean, variance_shift

__all__ = ['ECE_BINS', 'VS_IMAGES', 'predict', 'expected_calibration_error', 'split_metrics', 'bn_variance_shift']

#: equal-width confidence bins of the ECE (Guo et al., 2017)
ECE_BINS = 15
#: images of the variance-shift measurement: the first of the unaugmented training split, as the first studies
VS_IMAGES = 2000


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, *, batch_size: int = 500, device: Any = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``model`` in eval mode on every sample of ``dataset`` (which yields ready tensors).

    Returns:
        ``(logits [N, classes] float32 on the CPU, targets [N] int64)``.
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        logits.append(model(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y).long())
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: over equal-width bins of the top-1 confidence, the sample-weighted mean |accuracy − confidence|.

    Args:
        logits: ``[N, classes]``.
        targets: ``[N]`` class indices.
        bins: number of bins on [0, 1].

    Returns:
        The ECE, as a fraction (0: perfectly calibrated).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[10.0, 0.0], [10.0, 0.0]])  # ~100 % confident, one right one wrong
        >>> round(expected_calibration_error(logits, torch.tensor([0, 1])), 3)
        0.5
    """
    conf, pred = F.softmax(logits.double(), dim=1).max(dim=1)
    correct = pred.eq(targets).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur (softmax > 0)
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    n = float(len(targets))
    total = 0.0
    for b in range(bins):
        m = idx == b
        k = int(m.sum())
        if k:
            total += k / n * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return total


def split_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """``top1`` and ``top5`` (%), ``nll`` (mean cross-entropy), ``ece`` (fraction, 15 bins) and ``n``."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hit = topk.eq(targets[:, None])
    return dict(top1=100.0 * float(hit[:, 0].double().mean()), top5=100.0 * float(hit.any(dim=1).double().mean()),
                nll=float(F.cross_entropy(logits.double(), targets)), ece=expected_calibration_error(logits, targets),
                n=int(len(targets)))


def bn_variance_shift(model: nn.Module, dataset: Dataset, *, images: int = VS_IMAGES, batch_size: int = 500
                      ) -> Optional[Dict[str, Any]]:
    """The eval-mode variance shift of every BN layer, on ``images`` evenly spaced samples of ``dataset``.

    Per BN, the mean over channels of ``max(real / running, running / real)``, where ``real`` is the variance of
    its input in eval mode on these images and ``running`` its running variance (the statistics it normalises
    with); 1.0 means no shift. Dropout in train mode inflates the variance that the running statistics learn,
    which is the mechanism the paper's placement guideline avoids.

    Args:
        model: the trained network (its BN buffers are read, not changed).
        dataset: yields ``(input, target)`` ready tensors, e.g. the unaugmented training images.
        images: how many leading samples to measure on.
        batch_size: batch size of the measurement.

    Returns:
        ``dict(vs_mean=, vs_max=, vs_layers={bn name: shift}, vs_images=)``, or None when the model has no BN
        layer with running statistics (nothing to measure).
    """
    n = min(images, len(dataset))
    if n < 1:
        return None
    # evenly spaced samples, so a split stored class by class (an ImageFolder) is measured on every class
    index = [i * len(dataset) // n for i in range(n)]
    was_training = model.training
    loader = DataLoader(Subset(dataset, index), batch_size=batch_size, shuffle=False, num_workers=0)
    try:
        records = variance_shift(model, loader)
    except ValueError:  # no BN layer with running statistics: nothing to measure
        return None
    finally:
        model.train(was_training)
    return dict(vs_mean=shift_mean(records), vs_max=shift_max(records),
                vs_layers={r.name: round(r.metric, 5) for r in records}, vs_images=n)
