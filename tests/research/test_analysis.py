"""Module tests of the paper: measured variance shift and head variance against their analytic values."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_dropres.cli.analyze import main as analyze_main
from timm_dropres.research import analysis as A


def test_dropout_train_var_matches_inverted_dropout() -> None:
    x = torch.randn(400_000) * 1.5 + 0.7
    y = F.dropout(x, 0.3, training=True)
    assert y.var().item() == pytest.approx(A.dropout_train_var(1.5 ** 2, 0.7, 0.3), rel=0.02)
    with pytest.raises(ValueError, match='p must be in'):
        A.dropout_train_var(1.0, 0.0, 1.0)


def test_variance_shift_dropout_feeding_bn_matches_closed_form() -> None:
    mu, s2, p = 0.5, 1.0, 0.3
    model = nn.Sequential(nn.Dropout(p), nn.BatchNorm1d(32))
    model.eval()
    momentum = model[1].momentum
    batches = A.gaussian_batches(8, 512, (32,), mean=mu, std=s2 ** 0.5, seed=1)
    calib = A.gaussian_batches(8, 512, (32,), mean=mu, std=s2 ** 0.5, seed=2)
    recs = A.variance_shift(model, batches, calibrate_batches=calib)
    assert [r.name for r in recs] == ['1']
    expected = A.dropout_train_var(s2, mu, p) / s2
    assert recs[0].metric == pytest.approx(expected, rel=0.03)
    assert recs[0].real_var == pytest.approx(s2, rel=0.03)
    assert recs[0].running_var == pytest.approx(A.dropout_train_var(s2, mu, p), rel=0.03)
    assert A.shift_mean(recs) == A.shift_max(recs) == recs[0].metric
    # the model's own state is restored: eval mode and the BN momentum
    assert not model.training and not model[0].training and model[1].momentum == momentum
    # without dropout there is no shift (up to sampling noise, which biases max(r, 1/r) slightly above 1)
    clean = A.variance_shift(nn.Sequential(nn.BatchNorm1d(32)), batches, calibrate_batches=calib)
    assert 1.0 <= clean[0].metric < 1.05   # 4096 values per channel: ~2 % sampling error per variance
    assert 'mean' in A.format_shift_table(recs)


def test_variance_shift_errors() -> None:
    with pytest.raises(ValueError, match='no BatchNorm'):
        A.variance_shift(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match='empty'):
        A.variance_shift(nn.BatchNorm1d(2), [])
    with pytest.raises(TypeError, match='batch must be'):
        A.variance_shift(nn.BatchNorm1d(2), ['x'])


def test_variance_shift_on_dropres_model_orders_positions() -> None:
    """The post-act before_last_conv position shifts the branch's last BN; after_last_bn does not."""
    batches = A.gaussian_batches(2, 8, (3, 32, 32), seed=1)
    calib = A.gaussian_batches(2, 8, (3, 32, 32), seed=2)
    res = A.shift_by_position('test_resnet_dropres', ['none', 'after_last_bn', 'before_last_conv'], batches, calib,
                              res_drop_rate=0.3)
    names = [r.name for r in res['none']]
    model = timm.create_model('test_resnet_dropres')
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(names) == set(bns) and names[0] == bns[0]   # every BN, in forward order (stem first)
    last_bn = [r for r in res['before_last_conv'] if r.name.endswith('bn2')]
    assert last_bn and min(r.metric for r in last_bn) > 1.2
    assert A.shift_mean(res['before_last_conv']) > A.shift_mean(res['after_last_bn']) > A.shift_mean(res['none'])
    with pytest.raises(ValueError, match='position must be one of'):
        A.shift_by_position('test_resnet_dropres', ['middle'], batches, calib)


@pytest.mark.parametrize('pre_act', [True, False], ids=['pre', 'post'])
def test_residual_block_module_test_matches_analytic(pre_act: bool) -> None:
    results = A.residual_block_test(pre_act, p=0.3, mean=0.5, channels=8, size=8, batch_size=32, n_batches=4)
    by_pos = {r.position: r for r in results}
    assert list(by_pos) == list(A.BLOCK_POSITIONS['pre' if pre_act else 'post'])
    assert by_pos['none'].consumer_shift < 1.03 and by_pos['none'].out_var_train == pytest.approx(
        by_pos['none'].out_var_eval, rel=0.02)
    predicted = [r for r in results if r.consumer_shift_pred is not None]
    assert len(predicted) >= 5
    for r in predicted:
        # within 0.5 % at the CLI's default size (docs/analysis.md); this run is 16x smaller, and its
        # measured shifts sit 1.5-3.3 % above the first-order prediction depending on the dropout kernel's draws
        assert r.consumer_shift == pytest.approx(r.consumer_shift_pred, rel=0.05), r.position
        assert r.consumer_shift > 1.1, r.position   # every dropout that reaches a BN linearly shifts it
    for r in results:
        if r.out_var_pred is not None:
            assert r.out_var_train == pytest.approx(r.out_var_pred, rel=0.04), r.position
    if pre_act:
        closed = by_pos['before_bn1']
        assert closed.closed_form == pytest.approx(A.dropout_train_var(1.0, 0.5, 0.3))
        assert closed.consumer_shift == pytest.approx(closed.closed_form, rel=0.03)
        assert by_pos['before_conv2'].guideline and by_pos['before_conv2'].consumer == 'next_bn'
    else:
        assert by_pos['after_bn2'].guideline and by_pos['after_bn2'].consumer_shift_pred is None
        # the library's two post-act candidates: before_last_conv shifts the branch's own last BN
        assert by_pos['before_conv2'].consumer == 'bn2' and by_pos['before_conv2'].consumer_shift > 1.3
    assert 'consumer BN' in A.format_block_table(results)
    with pytest.raises(ValueError, match='must be one of'):
        A.ModuleTestBlock(4, pre_act=pre_act, position='nowhere', p=0.1)


def test_head_variance_iid_positions_follow_one_over_hw() -> None:
    sweep = A.iid_head_sweep((1, 2, 4), n=8, channels=16, n_masks=300)
    for r in sweep:
        assert r.ratio == pytest.approx(r.ratio_pred, rel=0.1)
        assert r.ratio_pred == pytest.approx(r.ratio_iid, rel=0.1)   # small spread: close to 1/(H*W)
    assert sweep[0].ratio_pred == pytest.approx(1.0)
    fc = nn.Linear(16, 5)
    r = A.head_variance_test(torch.rand(8, 16, 4, 4), fc=fc, n_masks=300)
    assert r.logit_ratio == pytest.approx(r.logit_ratio_pred, rel=0.1) and r.logit_ratio < 0.2
    with pytest.raises(ValueError, match='N, C, H, W'):
        A.head_variance_test(torch.rand(2, 3))
    with pytest.raises(ValueError, match='p must be > 0'):
        A.head_variance_test(torch.rand(2, 3, 2, 2), p=0.0)


def test_head_variance_on_real_feature_maps() -> None:
    model = timm.create_model('preresnet20_cifar_dropres')
    r = A.head_test_on_model(model, A.gaussian_batches(1, 8, (3, 32, 32)), n_masks=100)
    assert r.hw == 64
    assert r.ratio == pytest.approx(r.ratio_pred, rel=0.15)
    assert r.ratio < 0.1 and r.logit_ratio is not None and r.logit_ratio < 0.1   # ResNetV2's 1x1-conv classifier


def test_cli_block_and_head_write_plot_and_json(tmp_path, capsys) -> None:
    out, png = tmp_path / 'b.json', tmp_path / 'b.png'
    assert analyze_main(['block', '--form', 'pre', '--channels', '4', '--size', '4', '--batch-size', '16',
                         '--batches', '2', '--plot', str(png), '--json', str(out)]) == 0
    assert png.stat().st_size > 1000 and len(json.loads(out.read_text())['results']) == 7
    assert 'before_conv2 *' in capsys.readouterr().out
    png = tmp_path / 'h.png'
    assert analyze_main(['head', '--sizes', '1', '2', '--masks', '20', '--plot', str(png)]) == 0
    assert png.stat().st_size > 1000


def test_cli_shift_and_errors(tmp_path, capsys) -> None:
    png = tmp_path / 's.png'
    assert analyze_main(['shift', '--model', 'test_resnet_dropres', '--positions', 'none', 'before_last_conv',
                         '--input-size', '3', '32', '32', '--batches', '1', '--batch-size', '4',
                         '--plot', str(png)]) == 0
    out = capsys.readouterr().out
    assert 'position: before_last_conv' in out and 'summary:' in out and png.stat().st_size > 1000
    assert analyze_main(['shift', '--model', 'test_resnet_dropres', '--positions', 'sideways',
                         '--input-size', '3', '32', '32', '--batches', '1', '--batch-size', '4']) == 2
    assert 'sideways' in capsys.readouterr().err
