"""Saved folders and dry-run repos load in transformers (TimmWrapper), describe the weights they hold, and are
readable by others under the usual umask."""
from __future__ import annotations

import json
import os
import stat

import pytest
import timm
import torch
from transformers import AutoModelForImageClassification

from timm_dropres.hub.push import PushError, push
from timm_dropres.models.hf_folder import save_pretrained_folder, trained_pretrained_cfg

DATA_CFG = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2),
                crop_pct=0.9)


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('test_resnet_dropres', num_classes=3, res_drop_rate=0.1).eval()


def _logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = m(x)
    return out.logits if hasattr(out, 'logits') else out


def test_saved_folder_loads_in_transformers_with_timm_outputs(model, tmp_path):
    folder = save_pretrained_folder(model, tmp_path / 'm', label_names=['x', 'y', 'z'])
    cfg = json.loads((folder / 'config.json').read_text())
    assert 'num_classes' not in cfg['model_args'] and cfg['num_classes'] == 3
    hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    assert hf.config.id2label == {0: 'x', 1: 'y', 2: 'z'} and hf.config.num_labels == 3
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(hf, x), _logits(model, x), rtol=0, atol=1e-6)  # see test_push on rounding
    assert timm.create_model(f'local-dir:{folder}', pretrained=True).num_classes == 3  # timm reads the root's


def test_dry_run_repairs_a_folder_saved_before_the_fix(model, tmp_path):
    folder = save_pretrained_folder(model, tmp_path / 'old', label_names=['x', 'y', 'z'])
    cfg = json.loads((folder / 'config.json').read_text())
    cfg['model_args']['num_classes'] = 3  # what save_pretrained_folder wrote before
    (folder / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(TypeError, match="multiple values for keyword argument 'num_classes'"):
        AutoModelForImageClassification.from_pretrained(str(folder))
    push(folder, 'alice/old', dry_run=True, out_dir=tmp_path / 'repo')
    assert 'num_classes' not in json.loads((tmp_path / 'repo' / 'config.json').read_text())['model_args']
    hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / 'repo')).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_logits(hf, x), _logits(model, x), rtol=0, atol=1e-6)
    cfg['model_args']['num_classes'] = 5
    (folder / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(PushError, match='model_args num_classes 5 disagrees with num_classes 3'):
        push(folder, 'alice/old', dry_run=True, out_dir=tmp_path / 'repo2')


def test_trained_cfg_keeps_architecture_and_preprocessing_only(model):
    base = model.pretrained_cfg
    assert base['tag'] and base['input_size'] != [3, 32, 32]  # test_resnet's r160_in1k: what must not leak
    cfg = trained_pretrained_cfg(model, DATA_CFG)
    assert cfg == dict(num_classes=3, pool_size=None, first_conv=base['first_conv'], classifier=base['classifier'],
                       fixed_input_size=False, custom_load=False, input_size=[3, 32, 32], interpolation='bicubic',
                       mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2], crop_pct=0.9, crop_mode='center')
    assert trained_pretrained_cfg(model, DATA_CFG, license='mit')['license'] == 'mit'
    with pytest.raises(ValueError, match=r"unknown keys \['test_input_size'\], missing keys \['crop_pct'\]"):
        trained_pretrained_cfg(model, dict({k: v for k, v in DATA_CFG.items() if k != 'crop_pct'},
                                           test_input_size=(3, 64, 64)))
    with pytest.raises(ValueError, match=r"input_size \(1, 32, 32\) must be \(C, H, W\) with C = the model's 3"):
        trained_pretrained_cfg(model, dict(DATA_CFG, input_size=(1, 32, 32)))


def test_folders_get_the_umask_mode(model, tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_pretrained_folder(model, tmp_path / 'm', data_config=DATA_CFG)
        push(folder, 'alice/m', dry_run=True, out_dir=tmp_path / 'repo')
    finally:
        os.umask(old)
    for d in (folder, tmp_path / 'repo'):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o644}
