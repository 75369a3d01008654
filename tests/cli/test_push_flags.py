"""``dropres-push``: the library names its arguments, the CLI prints them as flags (exit 2, nothing uploaded)."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm

from timm_dropres.cli.push import main
from timm_dropres.hub.push import PushError, push
from timm_dropres.models.hf_folder import save_pretrained_folder

REPO = 'alice/test_resnet_dropres.cli'


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    model = timm.create_model('test_resnet_dropres', num_classes=3)
    return save_pretrained_folder(model, tmp_path_factory.mktemp('push') / 'best', label_names=['a', 'b', 'c'])


def test_dry_run_without_out_dir(folder: Path, capsys):
    with pytest.raises(PushError, match='^a dry run writes what would be uploaded to out_dir; pass one$'):
        push(folder, REPO, dry_run=True)  # the library's terms: its parameter
    assert main([str(folder), '--repo-id', REPO, '--dry-run']) == 2
    assert capsys.readouterr().err == 'error: a dry run writes what would be uploaded to --out-dir; pass one\n'


def test_dry_run_into_a_non_empty_folder(folder: Path, tmp_path: Path, capsys):
    (tmp_path / 'keep.txt').write_text('x')
    assert main([str(folder), '--repo-id', REPO, '--dry-run', '--out-dir', str(tmp_path), '-q']) == 2
    assert f'error: --out-dir {tmp_path} exists and is not an empty folder' in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ['keep.txt']


def test_no_token(folder: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path))  # no stored login
    assert main([str(folder), '--repo-id', REPO, '-q']) == 2
    assert 'error: no Hugging Face token: pass --token, set HF_TOKEN' in capsys.readouterr().err


def test_bad_repo_id_and_folder(folder: Path, tmp_path: Path, capsys):
    assert main([str(folder), '--repo-id', 'no-namespace', '--dry-run', '--out-dir', str(tmp_path / 'o')]) == 2
    assert "invalid repo id 'no-namespace'" in capsys.readouterr().err
    assert main([str(tmp_path), '--repo-id', REPO, '--dry-run', '--out-dir', str(tmp_path / 'o')]) == 2
    assert 'has no config.json or model.safetensors' in capsys.readouterr().err


def test_dataset_and_base_model_contradicting_the_runs_records(folder: Path, tmp_path: Path, capsys):
    """The card may claim only what the run recorded; the library names ``dataset``/``base_model``, the CLI flags."""
    import json
    import shutil

    from hub_helpers import make_summary

    run = tmp_path / 'run'
    shutil.copytree(folder, run / 'best')
    summary = make_summary(model='test_resnet_dropres', config=dict(make_summary()['config'], model='test_resnet'))
    (run / 'summary.json').write_text(json.dumps(summary))
    out = ['--repo-id', REPO, '--dry-run', '-q']
    with pytest.raises(PushError, match="^dataset 'cifar10': the run's records say"):
        push(run / 'best', REPO, dry_run=True, out_dir=tmp_path / 'o', dataset='cifar10')
    assert main([str(run / 'best'), *out, '--out-dir', str(tmp_path / 'o'), '--dataset', 'cifar10']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dataset 'cifar10': the run's records say") and err.endswith('drop --dataset\n')
    assert main([str(run / 'best'), *out, '--out-dir', str(tmp_path / 'o'), '--base-model', 'someone/else']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --base-model 'someone/else': the run's records say") and \
        err.endswith('drop --base-model\n')
    assert not (tmp_path / 'o').exists()  # nothing written
