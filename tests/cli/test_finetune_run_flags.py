"""``dropres-finetune`` / ``dropres-validate``: errors found while running (the run folder, resume, checkpoints,
data, divergence, a failed write) name options by field in the library; the CLI prints them as flags.

One tiny run (test_resnet_dropres, 32 px, 4 images a class) is stopped after 2 steps and reused.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

import pytest
from helpers_train import make_image_folder, tiny_config

import timm_dropres.training.trainer as trainer_mod
from timm_dropres.cli.finetune import main
from timm_dropres.cli.validate import main as validate_main
from timm_dropres.training.checkpoints import list_checkpoints
from timm_dropres.training.trainer import finetune

pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('flags') / 'shapes', n_train=4, n_val=2)


@pytest.fixture(scope='module')
def partial(data, tmp_path_factory) -> Path:
    """A run with EMA stopped after 2 of its 3 steps: checkpoints step 1 and 2."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp('partial') / 'run'
        finetune(tiny_config(data, out, checkpoint_every=1, stop_after_steps=2, ema=True, ema_decay=0.9))
    finally:
        torch.set_num_threads(n)
    return out


def _argv(data: Path, out: Path, *extra: str) -> List[str]:
    return ['--model', 'test_resnet_dropres', '--dataset', str(data), '--output-dir', str(out), '--cpu',
            '--num-workers', '0', '--batch-size', '4', '--img-size', '32', '--epochs', '1', '--no-progress',
            '--warmup-epochs', '0', '--lr', '3e-3', '--seed', '0', '--ema', '--ema-decay', '0.9', *extra]


def _error(capsys, prog: str = 'dropres-finetune') -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f'{prog}: error: ') and 'Traceback' not in err, err
    return lines[-1][len(f'{prog}: error: '):]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob('*')) if p.is_file()}


# ------------------------------------------------------------------------------------- the run folder


def test_a_folder_holding_a_run(data, partial, tmp_path, capsys):
    run = _copy(partial, tmp_path / 'run')
    before = _tree(run)
    assert main(_argv(data, run)) == 2
    line = _error(capsys)
    assert line.startswith(f'--output-dir {run} already holds a run (') and line.endswith(
        f'; pass --overwrite to replace its outputs, --resume {run} to continue it, or choose another --output-dir')
    assert main(_argv(data, run, '--resume', str(run), '--overwrite')) == 2
    line = _error(capsys)
    assert line.startswith(f'--overwrite with --resume {list_checkpoints(run)[-1]}: that checkpoint belongs to '
                           f'--output-dir {run}, which --overwrite would delete. Drop --overwrite'), line
    older = list_checkpoints(run)[0]
    assert main(_argv(data, run, '--resume', str(older))) == 2
    line = _error(capsys)
    assert line.startswith(f'--resume {older} is older than') and '(--output-dir <new>)' in line, line
    assert _tree(run) == before


def test_a_folder_with_foreign_files_or_a_file(data, tmp_path, capsys):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'notes.txt').write_text('x')
    assert main(_argv(data, out)) == 2
    line = _error(capsys)
    assert line.startswith(f"--output-dir {out} holds files a run does not write: ['notes.txt']. --overwrite "
                           'removes only') and line.endswith('choose a new or empty --output-dir, or move those files')
    afile = tmp_path / 'afile'
    afile.write_text('x')
    assert main(_argv(data, afile)) == 2
    assert _error(capsys) == f'--output-dir {afile} is a file, not a folder'


# ------------------------------------------------------------------------------------- resume and checkpoints


def test_resume_with_other_settings_or_data(data, partial, tmp_path, capsys):
    run = _copy(partial, tmp_path / 'run')
    assert main(_argv(data, run, '--resume', str(run), '--lr', '0.1', '--batch-size', '2')) == 2
    line = _error(capsys)
    assert line.startswith(f'--resume {list_checkpoints(run)[-1]}: settings differ'), line
    assert '--lr: checkpoint 0.003, this run 0.1' in line and '--batch-size: checkpoint 4, this run 2' in line
    assert line.endswith('or start a new run in another --output-dir (docs/training.md lists what a resumed run '
                         'may change)')
    other = _copy(data, tmp_path / 'other')
    sorted((other / 'train' / 'stripes').glob('*.png'))[0].unlink()  # one training image fewer
    assert main(_argv(other, tmp_path / 'o', '--resume', str(run))) == 2
    line = _error(capsys)
    assert line.startswith(f'--resume {list_checkpoints(run)[-1]}: the data differ'), line


def test_resume_of_a_missing_empty_or_damaged_checkpoint(data, partial, tmp_path, capsys):
    assert main(_argv(data, tmp_path / 'o', '--resume', str(tmp_path / 'nothing'))) == 2
    assert _error(capsys) == f'--resume {tmp_path / "nothing"} does not exist'
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert main(_argv(data, tmp_path / 'o', '--resume', str(empty))) == 2
    assert _error(capsys).startswith(f'--resume {empty}: no checkpoints found')
    run = _copy(partial, tmp_path / 'run')
    latest = list_checkpoints(run)[-1]
    (latest / 'model.safetensors').write_bytes(b'')
    assert main(_argv(data, run, '--resume', str(run))) == 2
    line = _error(capsys)
    assert line.startswith(f'checkpoint {latest} is corrupt or incomplete: ') and line.endswith(
        f'Resume the newest of them into a new folder: --resume {list_checkpoints(run)[0]} --output-dir <new folder>')
    first = list_checkpoints(run)[0]
    (first / 'ema.safetensors').unlink()
    assert main(_argv(data, tmp_path / 'o2', '--resume', str(first))) == 2
    assert _error(capsys) == (f'checkpoint {first} is corrupt or incomplete: --ema is on but it has no '
                              'ema.safetensors; this run has no older checkpoint to fall back to')
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'o2').exists()


# ------------------------------------------------------------------------------------- data and the model


def test_data_errors(data, tmp_path, capsys):
    assert main(_argv(data, tmp_path / 'o', '--val-fraction', '0.2')) == 2
    line = _error(capsys)
    assert line.startswith('--val-fraction 0.2 holds out part of the training images') and 'drop --val-fraction' in line
    assert main(_argv(tmp_path / 'missing', tmp_path / 'o')) == 2
    assert '. --dataset takes an ImageFolder root' in _error(capsys)
    assert main(_argv(data, tmp_path / 'o', '--train-subset', '3')) == 2  # 3 images, a batch of 4
    assert _error(capsys) == ('the training set has 3 images, fewer than one global batch (--batch-size 4 x 1 '
                              'processes); lower --batch-size to at most 3')
    rc = validate_main(['--model', 'test_resnet_dropres', '--dataset', 'torch/cifar10', '--data-dir', str(tmp_path),
                        '--cpu', '--num-workers', '0'])
    assert rc == 2 and _error(capsys, 'dropres-validate').endswith('Add --download to fetch it (needs internet).')
    assert not (tmp_path / 'o').exists()


def test_a_tracker_that_is_not_installed(data, tmp_path, monkeypatch, capsys):
    import accelerate.utils
    monkeypatch.setattr(accelerate.utils, 'is_wandb_available', lambda: False)
    assert main(_argv(data, tmp_path / 'o', '--log-with', 'wandb')) == 2
    assert _error(capsys) == '--log-with wandb: wandb is not installed (pip install wandb)'
    assert not (tmp_path / 'o').exists()


# ------------------------------------------------------------------------------------- a failed run (exit 1)


def test_divergence_and_a_failed_write_name_flags(data, tmp_path, monkeypatch, capsys):
    real = trainer_mod.evaluate

    def exploding(model, loader, **kw):
        import dataclasses
        return dataclasses.replace(real(model, loader, **kw), loss=1e33)

    monkeypatch.setattr(trainer_mod, 'evaluate', exploding)
    assert main(_argv(data, tmp_path / 'div')) == 1
    assert _error(capsys).endswith('Lower --lr or --momentum, or add --clip-grad')
    monkeypatch.undo()

    def full(self, output_dir=None, **kw):
        raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')

    monkeypatch.setattr(trainer_mod.Accelerator, 'save_state', full)
    out = tmp_path / 'full'
    assert main(_argv(data, out)) == 1
    line = _error(capsys)
    assert line.startswith('cannot write checkpoint') and line.endswith(
        f'the earlier checkpoints are intact (--resume {out} continues from the latest)'), line
