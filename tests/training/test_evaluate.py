"""dropres-validate and the YAML side of the CLIs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_train import make_image_folder, tiny_config

from timm_dropres.cli.finetune import main as finetune_main
from timm_dropres.cli.validate import main as validate_main
from timm_dropres.training.trainer import finetune

pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp('val')
    data = make_image_folder(base / 'shapes', n_train=8, n_val=3, gray=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = finetune(tiny_config(data, base / 'run', epochs=2, batch_size=4))
    finally:
        torch.set_num_threads(n)
    return data, base / 'run', summary


def test_validate_cli_on_a_trained_folder(run, tmp_path, capsys):
    data, out, summary = run
    assert summary['in_chans'] == 1
    results = tmp_path / 'r.json'
    rc = validate_main(['--model', f'local-dir:{out / "last"}', '--dataset', str(data), '--num-workers', '0',
                        '--cpu', '--batch-size', '2', '--results-file', str(results)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'top-1' in printed and 'circle' in printed
    r = json.loads(results.read_text())
    assert r['num_samples'] == 9 and set(r['per_class_accuracy']) == {'circle', 'square', 'stripes'}
    assert r['top1'] == pytest.approx(summary['last']['top1']) and r['loss'] == pytest.approx(summary['last']['loss'])
    assert r['per_class_accuracy'] == pytest.approx(summary['last']['per_class_accuracy'])
    # the same results file again needs --overwrite
    rc = validate_main(['--model', f'local-dir:{out / "last"}', '--dataset', str(data), '--num-workers', '0',
                        '--cpu', '--results-file', str(results)])
    assert rc == 2 and '--overwrite' in capsys.readouterr().err


def test_validate_train_split_and_unknown_class(run, tmp_path, capsys):
    data, out, _ = run
    rc = validate_main(['--model', f'local-dir:{out / "best"}', '--dataset', str(data), '--split', 'train',
                        '--num-workers', '0', '--cpu'])
    assert rc == 0 and '(24 images)' in capsys.readouterr().out
    other = make_image_folder(tmp_path / 'other', 1, 1, classes=('circle', 'zebra'), gray=True)
    rc = validate_main(['--model', f'local-dir:{out / "best"}', '--dataset', str(other), '--num-workers', '0'])
    assert rc == 2 and "classes the model does not know: ['zebra']" in capsys.readouterr().err


def test_validate_missing_model_folder(tmp_path, capsys):
    rc = validate_main(['--model', f'local-dir:{tmp_path / "nope"}', '--dataset', str(tmp_path)])
    assert rc == 2 and 'does not exist' in capsys.readouterr().err


def test_finetune_yaml_config_and_cli_override(run, tmp_path):
    data, _, _ = run
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(f'model: test_resnet_dropres\ndataset: {data}\nepochs: 1\nbatch-size: 4\nimg_size: 32\n'
                   f'num_workers: 0\nprogress: false\ncpu: true\nres_drop_rate: 0.05\nscale: [0.5, 1.0]\n'
                   f'output_dir: {tmp_path / "from_yaml"}\n')
    assert finetune_main(['--config', str(cfg), '--res-drop-rate', '0.15']) == 0
    s = json.loads((tmp_path / 'from_yaml' / 'summary.json').read_text())
    assert s['config']['res_drop_rate'] == 0.15 and s['config']['scale'] == [0.5, 1.0] and s['config']['epochs'] == 1
    assert s['dropout_args']['res_drop_rate'] == 0.15


def test_yaml_unknown_key_is_an_error(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: resnet18_dropres\nres_drop: 0.1\n')
    with pytest.raises(SystemExit):
        finetune_main(['--config', str(cfg)])
    assert "unknown option 'res_drop'" in capsys.readouterr().err


def test_shipped_configs_parse():
    from timm_dropres.cli._config_args import load_yaml
    from timm_dropres.training.config import FinetuneConfig
    repo = Path(__file__).resolve().parents[2]
    for name in ('fashion_mnist_resnet18.yaml', 'pets_resnet50.yaml'):
        cfg = FinetuneConfig(**load_yaml(repo / 'configs' / name, FinetuneConfig))
        assert cfg.model.split('.')[0].endswith('_dropres')
