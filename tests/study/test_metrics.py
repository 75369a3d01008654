"""ECE and the split metrics, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from timm_dropres.study.metrics import expected_calibration_error, split_metrics


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins (0.8667, 0.9333] and (0.5333, 0.6]
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    logits = p.log()
    targets = torch.tensor([0, 1, 0])
    want = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert expected_calibration_error(logits, targets) == pytest.approx(want)


def test_split_metrics():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    targets = torch.tensor([0, 0])
    m = split_metrics(logits, targets)
    assert m['top1'] == 50.0 and m['top5'] == 50.0 and m['n'] == 2  # second sample: class 0 ranks 6th
    assert m['nll'] == pytest.approx(float(F.cross_entropy(logits, targets)))
    assert 0.0 <= m['ece'] <= 1.0 and not math.isnan(m['ece'])
