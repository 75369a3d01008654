"""The paper's CIFAR networks: published parameter counts, placement, timm integration, recipes that train."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

import timm_dropres
from timm_dropres.models.cifar import CIFAR_ARCHS, cifar_model_names

RECIPES = Path(__file__).resolve().parents[2] / 'configs' / 'paper'

# published counts: He et al. 2016 (Table of CIFAR-10 results), Zagoruyko & Komodakis 2016 (WRN-28-10: 36.5M)
PUBLISHED_M = {'preresnet20_cifar': 0.27, 'preresnet56_cifar': 0.85, 'preresnet110_cifar': 1.7,
               'preresnet164_cifar': 1.7, 'wrn28_10_cifar': 36.5}


def _params(name: str, **kwargs) -> int:
    with torch.device('meta'):   # no memory, no init time: WRN-28-10 counts in milliseconds
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', list(CIFAR_ARCHS))
def test_parameter_counts_match_published(name: str) -> None:
    count = _params(name) / 1e6
    assert count == pytest.approx(PUBLISHED_M[name], rel=0.03), count
    assert _params(name + '_dropres') == _params(name)   # dropout adds no parameters
    assert _params(name, num_classes=100) - _params(name) == 90 * (CIFAR_ARCHS[name][1][-1] + 1)


def test_registered_with_cifar_cfg() -> None:
    assert set(cifar_model_names()) <= set(timm.list_models('*_cifar*'))
    cfg = timm.get_pretrained_cfg('preresnet110_cifar_dropres')
    assert cfg.input_size == (3, 32, 32) and cfg.num_classes == 10 and cfg.mean[0] == pytest.approx(0.4914)
    assert cfg.url is None and cfg.hf_hub_id is None and not timm.list_pretrained('*_cifar*')


def test_architecture_and_placement() -> None:
    model = timm.create_model('preresnet20_cifar_dropres', res_drop_rate=0.2, drop_rate=0.3)
    stem = model.stem.conv
    assert (stem.kernel_size, stem.stride, stem.out_channels) == ((3, 3), (1, 1), 16) and len(model.stem) == 1
    assert [s.blocks[0].conv1.out_channels for s in model.stages] == [16, 32, 64]
    blocks = list(timm_dropres.residual_blocks(model))
    assert len(blocks) == 9 and all(b.res_drop_pos == 'before_last_conv' and b.res_drop.p == 0.2 for _, b in blocks)
    assert timm_dropres.dropout_args(model) == dict(drop_rate=0.3, res_drop_rate=0.2, res_drop_pos='before_last_conv')
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.forward_features(x).shape == (2, 64, 8, 8)
    feats = timm.create_model('preresnet20_cifar', features_only=True)
    assert feats.feature_info.reduction() == [1, 1, 2, 4] and feats(x)[-1].shape == (2, 64, 8, 8)
    bottleneck = timm.create_model('preresnet164_cifar_dropres')
    assert type(bottleneck.stages[0].blocks[0]).__name__ == 'DropResPreActBottleneck'
    assert bottleneck.stages[0].blocks[0].conv3.in_channels == 16   # bottleneck widths 16-32-64, outputs x4
    with pytest.raises(ValueError, match='res_drop_pos must be one of'):
        timm.create_model('preresnet20_cifar_dropres', res_drop_pos='middle')


def test_wrn_keeps_its_original_dropout_position() -> None:
    with torch.device('meta'):
        wrn = timm.create_model('wrn28_10_cifar_dropres', res_drop_rate=0.3)
    blocks = list(timm_dropres.residual_blocks(wrn))
    assert len(blocks) == 12 and [s.blocks[0].conv2.out_channels for s in wrn.stages] == [160, 320, 640]
    assert all(b.res_drop_pos == 'before_last_conv' for _, b in blocks)   # BN-ReLU-dropout-conv, as in WRN


def _tiny_image_folder(root: Path, classes: int = 10, per_class: int = 2) -> Path:
    """train/ only, as CIFAR's training split: the recipes hold out --val-fraction of it (a val/ folder would be
    the validation split, and --val-fraction beside one is refused)."""
    rng = np.random.default_rng(0)
    for split in ('train',):
        for c in range(classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root


@pytest.mark.slow
@pytest.mark.parametrize('recipe, target, model', [
    ('preresnet110_cifar10.yaml', '94.44 %', None),
    ('preresnet110_cifar10_nodrop.yaml', '94.44 %', 'preresnet20_cifar'),
    ('preresnet110_cifar100.yaml', '73.98 %', 'preresnet20_cifar_dropres'),
    ('preresnet110_cifar100_nodrop.yaml', '73.98 %', 'preresnet20_cifar'),
])
def test_paper_recipe_runs_one_step(tmp_path: Path, recipe: str, target: str, model: str | None) -> None:
    from timm_dropres.cli.finetune import main as finetune_main
    path = RECIPES / recipe
    text = path.read_text()
    assert target in text and '164 epochs' in text   # the target and the schedule are written down
    cfg = yaml.safe_load(text)
    assert (cfg['opt'], cfg['lr'], cfg['momentum'], cfg['weight_decay'], cfg['batch_size'], cfg['epochs']) == (
        'sgd', 0.1, 0.9, 1e-4, 128, 164)
    assert (cfg['sched'], cfg['decay_milestones'], cfg['decay_rate'], cfg['pad_crop']) == (
        'multistep', [81, 122], 0.1, 4)
    assert 0 < cfg['val_fraction'] < 1  # model selection on held-out training images, never the test split
    twin = yaml.safe_load((RECIPES / recipe.replace('_nodrop', '')).read_text())
    other = yaml.safe_load((RECIPES / recipe.replace('.yaml', '_nodrop.yaml').replace('_nodrop_nodrop', '_nodrop')
                            ).read_text())
    differ = {k for k in set(twin) | set(other) if twin.get(k) != other.get(k)}
    assert differ == {'model', 'drop_rate', 'res_drop_rate', 'output_dir'}  # the twins differ only in dropout
    assert other['drop_rate'] == 0.0 and 'res_drop_rate' not in other and not other['model'].endswith('_dropres')
    data = _tiny_image_folder(tmp_path / 'data')
    argv = ['--config', str(path), '--dataset', str(data), '--no-download', '--data-dir', str(data),
            '--batch-size', '4', '--num-workers', '0', '--output-dir', str(tmp_path / 'run'), '--cpu',
            '--no-progress', '--stop-after-steps', '1']
    if model:   # the CIFAR-100 recipe also trains the smallest network of the family
        argv += ['--model', model]
    assert finetune_main(argv) == 0
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['global_steps'] == 1 and summary['model'] == (model or cfg['model'])
    assert summary['input_size'] == [3, 32, 32]


@pytest.mark.slow
@pytest.mark.parametrize('dataset, target', [('10', '96.11 %'), ('100', '81.15 %')])
def test_wrn_recipes_follow_the_wrn_paper_and_run_one_step(tmp_path: Path, dataset: str, target: str) -> None:
    """WRN-28-10 recipes: the WRN paper's schedule and protocol (all 50k images, last epoch), no-dropout twins."""
    from timm_dropres.cli.finetune import main as finetune_main
    path = RECIPES / f'wrn28_10_cifar{dataset}.yaml'
    text = path.read_text()
    assert target in text and 'report the last epoch' in text
    cfg = yaml.safe_load(text)
    assert (cfg['opt'], cfg['lr'], cfg['momentum'], cfg['weight_decay'], cfg['batch_size'], cfg['epochs']) == (
        'sgd', 0.1, 0.9, 5e-4, 128, 200)
    assert (cfg['sched'], cfg['decay_milestones'], cfg['decay_rate'], cfg['pad_crop'], cfg['warmup_epochs']) == (
        'multistep', [60, 120, 160], 0.2, 4, 0)
    assert (cfg['model'], cfg['res_drop_rate'], cfg['drop_rate']) == ('wrn28_10_cifar_dropres', 0.3, 0.0)
    assert 'val_fraction' not in cfg  # the paper trains on all 50k training images
    twin = yaml.safe_load((RECIPES / f'wrn28_10_cifar{dataset}_nodrop.yaml').read_text())
    differ = {k for k in set(twin) | set(cfg) if twin.get(k) != cfg.get(k)}
    assert differ == {'model', 'res_drop_rate', 'output_dir'} and twin['model'] == 'wrn28_10_cifar'
    data = _tiny_image_folder(tmp_path / 'data')
    argv = ['--config', str(path), '--dataset', str(data), '--no-download', '--data-dir', str(data),
            '--batch-size', '4', '--num-workers', '0', '--output-dir', str(tmp_path / 'run'), '--cpu',
            '--no-progress', '--stop-after-steps', '1', '--model', 'preresnet20_cifar_dropres']
    assert finetune_main(argv) == 0  # the recipe's options train (on the smallest network of the family)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['global_steps'] == 1 and summary['dropout_args']['res_drop_rate'] == 0.3
