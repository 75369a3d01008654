"""Saved folders rebuild the same placement through timm's local-dir: loader."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import timm_dropres
from timm_dropres.models.hf_folder import read_folder_config, save_pretrained_folder


@pytest.mark.parametrize('arch,pos', [('resnet18', 'before_last_conv'), ('resnetv2_18', 'auto')])
def test_config_json_rebuilds_same_placement(tmp_path, arch, pos):
    model = timm.create_model(f'{arch}_dropres', num_classes=3, res_drop_rate=0.2, drop_rate=0.3, res_drop_pos=pos)
    folder = save_pretrained_folder(model, tmp_path / 'best', label_names=['a', 'b', 'c'])
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
    cfg = read_folder_config(folder)
    assert cfg['architecture'] == f'{arch}_dropres' and cfg['label_names'] == ['a', 'b', 'c']
    assert {k: cfg['model_args'][k] for k in ('drop_rate', 'res_drop_rate', 'res_drop_pos')} == \
        timm_dropres.dropout_args(model)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert timm_dropres.dropout_sites(loaded) == timm_dropres.dropout_sites(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_channels_last_model_saves_and_stays_channels_last(tmp_path):
    """safetensors refuses strided tensors; export saves a contiguous copy and leaves the model as it was."""
    model = timm.create_model('test_resnet_dropres', num_classes=3).to(memory_format=torch.channels_last)
    model.fc.weight.data = model.fc.weight.data.t().contiguous().t()  # a strided 2-D weight too
    assert not model.conv1[0].weight.is_contiguous() and not model.fc.weight.is_contiguous()
    folder = save_pretrained_folder(model, tmp_path / 'cl')
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.fc.weight.is_contiguous()
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_save_replaces_existing_folder_atomically(tmp_path):
    model = timm.create_model('test_resnet_dropres', num_classes=2)
    target = tmp_path / 'last'
    save_pretrained_folder(model, target)
    (target / 'stale.txt').write_text('old')
    save_pretrained_folder(model, target)
    assert not (target / 'stale.txt').exists()
    assert [p.name for p in tmp_path.iterdir()] == ['last']  # no temp or backup folders left behind


def test_read_folder_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='has no config.json'):
        read_folder_config(tmp_path)
    (tmp_path / 'config.json').write_text('{nope')
    with pytest.raises(ValueError, match='not valid JSON'):
        read_folder_config(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'x'}))
    assert read_folder_config(tmp_path) == {'architecture': 'x'}
