"""ECE, the split metrics and the BN variance shift, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from timm_dropres.study.metrics import bn_variance_shift, expected_calibration_error, split_metrics


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


def test_bn_variance_shift_on_a_known_shift_and_on_every_class():
    """A BN whose running variance is 5 while its input's is 5 has no shift; measured on the first half only (variance
    1), it would be 5. The samples are spread over the dataset, so a split stored class by class is measured whole."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2))
    torch.nn.init.ones_(model[0].weight)
    model[1].running_var.fill_(5.0)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, 1, 4, 4, generator=g), 3 * torch.randn(2000, 1, 4, 4, generator=g)])
    data = torch.utils.data.TensorDataset(x, torch.zeros(4000, dtype=torch.long))
    model.train()
    got = bn_variance_shift(model, data, images=2000)
    assert model.training, 'the model is left in the mode it came in'
    assert got['vs_images'] == 2000 and list(got['vs_layers']) == ['1']
    assert got['vs_mean'] == got['vs_max'] == pytest.approx(1.0, abs=0.05)
    model[1].running_var.fill_(1.0)  # now the running variance is 5x too small
    assert bn_variance_shift(model, data)['vs_mean'] == pytest.approx(5.0, rel=0.05)
    assert bn_variance_shift(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1)), data) is None  # no BN: nothing to measure
    assert bn_variance_shift(model, torch.utils.data.TensorDataset(x[:0], torch.zeros(0))) is None
