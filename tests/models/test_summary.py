"""describe(): the placement, readable."""
from __future__ import annotations

import timm

import timm_dropres


def test_describe_lists_each_dropout():
    model = timm.create_model('resnet18_dropres', res_drop_rate=0.15, drop_rate=0.25, res_drop_pos='before_last_conv')
    text = timm_dropres.describe(model)
    lines = text.splitlines()
    assert lines[0] == 'DropResNet: 9 dropout modules'
    assert 'layer1.0.res_drop  before_last_conv  0.15' in text
    assert lines[-1].split() == ['head_drop', 'head_before_pool', '0.25']
    assert 'where=before_last_conv' in str(model.layer1[0])  # print(model) shows it too


def test_describe_plain_model():
    assert timm_dropres.describe(timm.create_model('resnet18')) == 'ResNet: no dropres dropout'
