"""Fault suite, second pass (issue 20): data read as laid out, values checked where they enter, faults in one line.

Every case ends in the correct behaviour or in one ``<prog>: error:`` line with no traceback, and a refused run
leaves nothing behind. Runs are tiny (test_resnet_dropres, 32 px, 4 images a class).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Dict

import pytest
import timm
from helpers_train import make_image_folder, tiny_config
from safetensors import SafetensorError

import timm_dropres.models.hf_folder as export_mod
import timm_dropres.training.trainer as trainer_mod
from timm_dropres.cli.finetune import main as finetune_main
from timm_dropres.cli.validate import main as validate_main
from timm_dropres.models.hf_folder import save_pretrained_folder
from timm_dropres.training.checkpoints import RUN_LOCK, list_checkpoints
from timm_dropres.training.data import DataError, resolve_data
from timm_dropres.training.trainer import finetune

pytestmark = pytest.mark.usefixtures('one_torch_thread')

LABELS = ['circle', 'square', 'stripes']


def _one_error_line(err: str, prog: str = 'dropres-finetune') -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f'{prog}: '), err
    assert 'Traceback' not in err, err
    return lines[-1]


def _argv(data: Path, out: Path, *extra: str) -> list:
    return ['--model', 'test_resnet_dropres', '--dataset', str(data), '--output-dir', str(out), '--cpu',
            '--num-workers', '0', '--batch-size', '4', '--img-size', '32', '--epochs', '1', '--no-progress',
            '--warmup-epochs', '0', *extra]


def _tree(root: Path) -> Dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('inputs') / 'shapes', n_train=4, n_val=2)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory) -> Path:
    model = timm.create_model('test_resnet_dropres', num_classes=3)
    return save_pretrained_folder(model, tmp_path_factory.mktemp('model') / 'best', label_names=LABELS)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------- 3. data read as laid out


def test_images_in_subfolders_take_their_class_folders_label(data, tmp_path, caplog):
    ds = _copy(data, tmp_path / 'ds')
    sub = ds / 'train' / 'circle' / 'indoor'  # 2 circles moved one level down
    sub.mkdir()
    for p in sorted((ds / 'train' / 'circle').glob('*.png'))[:2]:
        p.rename(sub / p.name)
    deep = ds / 'train' / 'square' / 'a' / 'b'  # a class whose images all sit in a subfolder
    deep.mkdir(parents=True)
    for p in sorted((ds / 'train' / 'square').glob('*.png')):
        p.rename(deep / p.name)
    with caplog.at_level(logging.INFO, logger='timm_dropres.training.data.folder_scan'):
        b = resolve_data(str(ds))
    files = {b.train.filename(i): t for i, (_, t) in enumerate(b.train.samples)}
    assert len(files) == 12 and sorted(b.train.targets_list) == [0] * 4 + [1] * 4 + [2] * 4
    assert all(files[f] == 0 for f in files if f.startswith('circle/indoor/'))
    assert sum(f.startswith('square/a/b/') for f in files) == 4
    assert '6 images sit in subfolders of class folders and are labelled with their class folder' in caplog.text


def test_a_flat_folder_reads_exactly_as_timms_reader(data):
    """Same files, labels and order as timm's reader gave: checkpoints' data digests of flat folders still match."""
    from timm.data import create_dataset

    from timm_dropres.training.data.folder_scan import class_folder_samples
    class_map = {c: i for i, c in enumerate(LABELS)}
    for split in ('train', 'val'):
        timm_samples = create_dataset('', root=str(data / split), split='', search_split=False,
                                      class_map=class_map).reader.samples
        assert class_folder_samples(data / split, class_map) == list(timm_samples)


def test_a_symlink_loop_is_refused_with_its_path(data, tmp_path):
    ds = _copy(data, tmp_path / 'ds')
    loop = ds / 'train' / 'circle' / 'loop'
    loop.symlink_to('..')
    with pytest.raises(DataError, match=rf'{loop} \(through the symbolic link {loop} -> \.\.\) leads to a folder '
                                        rf'already read as {ds / "train"}: a symbolic link loop'):
        finetune(tiny_config(ds, tmp_path / 'o'))
    assert not (tmp_path / 'o').exists()
    loop.unlink()
    twice = ds / 'train' / 'square' / 'again'  # a second link to another class's images
    twice.symlink_to(ds / 'train' / 'circle')
    with pytest.raises(DataError, match='a second link to the same images'):
        resolve_data(str(ds))


def test_loose_images_beside_class_folders_are_named(data, tmp_path, caplog):
    ds = _copy(data, tmp_path / 'ds')
    shutil.copy(next((ds / 'train' / 'circle').glob('*.png')), ds / 'train' / 'stray.png')
    with caplog.at_level(logging.WARNING, logger='timm_dropres.training.data.folder_scan'):
        b = resolve_data(str(ds))
    assert len(b.train) == 12 and "1 image(s) outside any class folder are not used: ['stray.png']" in caplog.text


def test_an_output_dir_inside_the_dataset_is_refused(data, tmp_path, capsys):
    ds = _copy(data, tmp_path / 'ds')
    before = _tree(ds)
    for out in (ds / 'train' / 'zz_out', ds):
        with pytest.raises(SystemExit) as e:
            finetune_main(_argv(ds, out))
        line = _one_error_line(capsys.readouterr().err)
        assert e.value.code == 2
        assert f'--output-dir {out} is inside --dataset {ds}' in line, line
    assert _tree(ds) == before and not (ds / 'train' / 'zz_out').exists()


def test_val_fraction_with_a_val_folder_is_refused(data, tmp_path):
    with pytest.raises(DataError, match=r'^val_fraction 0.2 holds out .* has a val/ folder.*; drop val_fraction'):
        finetune(tiny_config(data, tmp_path / 'o', val_fraction=0.2))
    assert not (tmp_path / 'o').exists()


def test_classes_absent_from_val_are_named_in_a_warning(data, tmp_path, caplog):
    ds = _copy(data, tmp_path / 'ds')
    shutil.rmtree(ds / 'val' / 'stripes')
    with caplog.at_level(logging.WARNING, logger='timm_dropres.training.data'):
        b = resolve_data(str(ds))
    assert b.label_names == LABELS and len(b.val) == 4
    assert f"{ds / 'val'} has no folder for the classes ['stripes']" in caplog.text


# ------------------------------------------------------------------------- 4. values checked where they enter


@pytest.mark.parametrize('argv, message', [
    (['--img-size', '100000'], r'--img-size must be a whole number of pixels in \[1, 8192\], got 100000'),
    (['--pad-crop', '100000'], r'--pad-crop must be a whole number of pixels in \[0, 8192\], got 100000'),
    (['--pad-crop', '40'], '--pad-crop 40 pads more than the whole --img-size 32'),
    (['--sched', 'none'], "--sched 'none': it is no scheduler.*--sched constant keeps it fixed; valid with these "
                          r"settings: \['cosine'"),
    (['--sched', 'bogus'], "--sched 'bogus': timm refuses it \\(Unknown scheduler 'bogus'.\\)"),
    (['--sched', 'plateau'], "--sched 'plateau': timm refuses it"),
    (['--interpolation', 'bogus'], r"--interpolation 'bogus' is not an interpolation timm knows; valid: \['nearest'"),
    (['--aa', 'bogus'], "--aa 'bogus' is not an augmentation policy timm builds .*rand-<options>.*'original'"),
    (['--mixup', '1', '--cutmix', '1', '-b', '3'], '--mixup/--cutmix need an even --batch-size.*got --batch-size 3'),
    (['--crop-pct', '100'], r'--crop-pct .* must be in \(0, 1\], got 100.0'),
    (['--scale', '-1', '0'], r'--scale must be two numbers with 0 < low <= high <= 1, got \[-1.0, 0.0\]'),
    (['--ratio', '0', '0'], r'--ratio must be two numbers with 0 < low <= high, got \[0.0, 0.0\]'),
    (['--momentum', '5'], r'--momentum must be in \[0, 1\)'),
])
def test_bad_flags_exit_2_naming_the_flag_before_anything_is_written(data, tmp_path, capsys, argv, message):
    import re
    with pytest.raises(SystemExit) as e:
        finetune_main(_argv(data, tmp_path / 'o', *argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err), err
    assert not (tmp_path / 'o').exists()


def test_a_yaml_key_given_twice_is_refused(data, tmp_path, capsys):
    cfg = tmp_path / 'run.yaml'
    cfg.write_text('lr: 0.1\nepochs: 1\nlr: 0.001\n')
    with pytest.raises(SystemExit) as e:
        finetune_main(['--config', str(cfg), '--dataset', str(data), '--output-dir', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--config {cfg} is not valid YAML (line 3, column 1): the key 'lr' is given " \
                                 'twice (first on line 1)' in err, err


def test_a_yaml_anchor_bomb_is_not_expanded_into_the_message(data, tmp_path, capsys):
    """A list of 9 anchored lists, each 9 references to the previous one: 9 ** 9 strings when expanded."""
    names = 'abcdefghi'
    parts = [f'&a [{", ".join(["lol"] * 9)}]']
    parts += [f'&{n} [{", ".join([f"*{names[i]}"] * 9)}]' for i, n in enumerate(names[1:])]
    value = f'[{", ".join(parts)}]'
    cfg = tmp_path / 'bomb.yaml'
    cfg.write_text(f'scale: {value}\n')
    assert cfg.stat().st_size < 4000
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        finetune_main(['--config', str(cfg), '--dataset', str(data), '--output-dir', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err) < 1000, err[:3000]
    assert "scale: expected a list of 2 values, got [['lol', " in err, err
    assert time.perf_counter() - t0 < 30


def _damaged_config(model_dir: Path, tmp_path: Path, name: str, change: Any) -> Path:
    d = _copy(model_dir, tmp_path / name)
    cfg = json.loads((d / 'config.json').read_text())
    cfg = change(cfg)
    (d / 'config.json').write_text(json.dumps(cfg))
    return d


def _set_pc(key: str, value: Any):
    def change(cfg):
        cfg['pretrained_cfg'][key] = value
        return cfg
    return change


@pytest.mark.parametrize('name, change, message', [
    ('list', lambda cfg: [cfg], 'config.json must hold a JSON object .*, got a JSON list'),
    ('mean_str', _set_pc('mean', '0.5'), r"pretrained_cfg.mean must be a list of 3 numbers, one per input channel, "
                                         r"got '0.5'"),
    ('mean_2', _set_pc('mean', [0.5, 0.5]), r'pretrained_cfg.mean must be a list of 3 numbers.*got \[0.5, 0.5\]'),
    ('std_0', _set_pc('std', [0.2, 0.0, 0.2]), 'pretrained_cfg.std must be a list of 3 positive numbers'),
    ('huge', _set_pc('input_size', [3, 100000, 100000]), r'input_size \[3, 100000, 100000\]: .*\[1, 8192\]'),
    ('crop', _set_pc('crop_pct', 'full'), r"crop_pct must be a number in \(0, 1\], got 'full'"),
    ('labels', lambda cfg: dict(cfg, label_names=['a']), 'label_names has 1 names for num_classes 3'),
])
def test_config_json_is_checked_key_by_key(data, model_dir, tmp_path, capsys, name, change, message):
    import re
    d = _damaged_config(model_dir, tmp_path, name, change)
    rc = validate_main(['--model', f'local-dir:{d}', '--dataset', str(data), '--num-workers', '0', '--cpu'])
    line = _one_error_line(capsys.readouterr().err, 'dropres-validate')
    assert rc == 2 and str(d / 'config.json') in line and re.search(message, line), line


# ------------------------------------------------------------------------- 5. faults in one line, nothing half-written


def _damage(path: Path, how: str) -> None:
    if how == 'empty':
        path.write_bytes(b'')
    elif how == 'huge_header':
        path.write_bytes(struct.pack('<Q', 2 ** 60) + b'{}')
    elif how == 'lying_header':
        header = json.dumps({'w': {'dtype': 'F32', 'shape': [1000], 'data_offsets': [0, 4000]}}).encode()
        path.write_bytes(struct.pack('<Q', len(header)) + header + bytes(40))
    else:  # a symlink to a text file
        text = path.with_name('notes.txt')
        text.write_text('not weights\n' * 20)
        path.unlink()
        path.symlink_to(text.name)


@pytest.mark.parametrize('how', ['empty', 'huge_header', 'lying_header', 'text_link'])
def test_a_damaged_safetensors_file_is_named_in_one_line(data, model_dir, tmp_path, capsys, how):
    d = _copy(model_dir, tmp_path / 'm')
    weights = d / 'model.safetensors'
    _damage(weights, how)
    rc = validate_main(['--model', f'local-dir:{d}', '--dataset', str(data), '--num-workers', '0', '--cpu'])
    line = _one_error_line(capsys.readouterr().err, 'dropres-validate')
    assert rc == 2 and f'{weights}' in line and 'is not a readable safetensors file' in line, line
    for flag in ('--model', '--initial-checkpoint', '--pretrained-file'):
        value = f'local-dir:{d}' if flag == '--model' else str(weights)
        with pytest.raises(SystemExit) as e:
            finetune_main(_argv(data, tmp_path / 'o', flag, value))
        err = capsys.readouterr().err
        assert e.value.code == 2 and f'{weights}' in err and 'not a readable safetensors file' in err, err
        assert 'Traceback' not in err
    assert not (tmp_path / 'o').exists()


def _disk_full_in_save_state(monkeypatch) -> None:
    """torch's writer meets a full disk in the second checkpoint: a RuntimeError, after a partial file."""
    real = trainer_mod.Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / 'optimizer.bin').write_bytes(b'partial')
            raise RuntimeError('[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing '
                               'file data/0: file write failed')
        return real(self, output_dir, **kw)

    monkeypatch.setattr(trainer_mod.Accelerator, 'save_state', save_state)


def test_disk_full_as_torchs_runtime_error_exits_1_and_leaves_no_partial_checkpoint(data, tmp_path, monkeypatch,
                                                                                       capsys):
    _disk_full_in_save_state(monkeypatch)
    out = tmp_path / 'full'
    assert finetune_main(_argv(data, out, '--checkpoint-every', '1')) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert 'cannot write checkpoint' in line and 'PytorchStreamWriter failed writing file' in line, line
    assert 'the earlier checkpoints are intact' in line
    assert [p.name for p in (out / 'checkpoints').iterdir()] == ['step_000000001'] and not (out / RUN_LOCK).exists()


def test_disk_full_in_best_as_safetensor_error_exits_1_and_leaves_no_partial_export(data, tmp_path, monkeypatch,
                                                                                      capsys):
    def save_for_hf(model, save_directory, **kw):
        (Path(save_directory) / 'model.safetensors').write_bytes(b'partial')
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(export_mod, 'save_for_hf', save_for_hf)
    out = tmp_path / 'full'
    assert finetune_main(_argv(data, out)) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f'cannot write {out / "best"}: SafetensorError: Error while serializing' in line, line
    assert sorted(p.name for p in out.iterdir()) == ['args.yaml', 'checkpoints']  # no .best.dropres-tmp-*


def test_ctrl_c_exits_130_in_one_line_with_the_checkpoint_intact(data, tmp_path, monkeypatch, capsys):
    real = trainer_mod.write_json_atomic
    calls = []

    def interrupted(path, obj, **kw):  # Ctrl-C while the second checkpoint is being written
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, obj, **kw)

    monkeypatch.setattr(trainer_mod, 'write_json_atomic', interrupted)
    out = tmp_path / 'run'
    assert finetune_main(_argv(data, out, '--checkpoint-every', '1', '--epochs', '2')) == 130
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert line == (f'dropres-finetune: interrupted (Ctrl-C); nothing half-written is left, and --resume {out} '
                    'continues from the latest checkpoint'), line
    assert [p.name for p in (out / 'checkpoints').iterdir()] == ['step_000000001'] and not (out / RUN_LOCK).exists()
    monkeypatch.undo()
    assert finetune_main(_argv(data, out, '--checkpoint-every', '1', '--epochs', '2', '--resume', str(out))) == 0


def test_an_exploding_validation_loss_stops_with_exit_1_and_no_export(data, tmp_path, monkeypatch, capsys):
    """--momentum 5 (now refused) reached a finite validation loss of 1e33 and exported best/ with exit 0."""
    real = trainer_mod.evaluate
    calls = []

    def exploding(model, loader, **kw):
        res = real(model, loader, **kw)
        calls.append(1)
        return dataclasses.replace(res, loss=1e33) if len(calls) == 2 else res

    monkeypatch.setattr(trainer_mod, 'evaluate', exploding)
    out = tmp_path / 'run'
    assert finetune_main(_argv(data, out, '--epochs', '2', '--checkpoint-every', '1', '--keep-checkpoints', '9')) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert 'training diverged: the validation loss after epoch 2 is 1e+33, above 1099' in line, line
    assert f'the last epoch-end checkpoint is {out / "checkpoints" / "step_000000003"}' in line
    best = json.loads((out / 'best' / 'config.json').read_text())
    assert best['metrics']['epoch'] == 1 and not (out / 'last').exists() and not (out / 'summary.json').exists()


def test_disk_full_while_writing_the_summary_is_one_line(data, tmp_path, monkeypatch, capsys):
    real = trainer_mod.write_json_atomic

    def full(path, obj, **kw):
        if Path(path).name == 'summary.json':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj, **kw)

    monkeypatch.setattr(trainer_mod, 'write_json_atomic', full)
    out = tmp_path / 'run'
    assert finetune_main(_argv(data, out)) == 1
    assert 'No space left on device' in _one_error_line(capsys.readouterr().err)
    assert list_checkpoints(out) and not [p for p in out.iterdir() if p.name.startswith('.')]


@pytest.mark.slow
def test_a_real_ctrl_c_exits_130_in_one_line(data, tmp_path):
    """SIGINT to the CLI (with a loader worker) after its first checkpoint: one line, no traceback, status 130."""
    import signal
    import subprocess

    from helpers_train import PYTHON, subprocess_env
    out = tmp_path / 'run'
    proc = subprocess.Popen([PYTHON, '-m', 'timm_dropres.cli.finetune', *_argv(data, out, '--epochs', '200',
                                                                               '--num-workers', '1')],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored:
                            # give the CLI the default disposition a terminal's foreground job has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list_checkpoints(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list_checkpoints(out), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert _one_error_line(err).startswith('dropres-finetune: interrupted (Ctrl-C)')
    assert not (out / RUN_LOCK).exists() and not [p for p in out.rglob('.*')]
    assert '[RANK 0]' not in err  # a single-process run's log lines carry no rank


def test_gray_data_gets_averaged_statistics_without_timms_warning(caplog):
    from timm_dropres.training.data import channel_stats, resolve_transforms
    model = timm.create_model('test_resnet_dropres', num_classes=3, in_chans=1)
    with caplog.at_level(logging.WARNING, logger='timm'):
        _, _, cfg = resolve_transforms(model, 1, img_size=32)
    assert len(cfg['mean']) == 1 and 'does not match' not in caplog.text
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="pretrained_cfg mean has 2 values, but the data has 1 channel"):
        channel_stats(model, 1)


@pytest.mark.parametrize('argv, message', [
    (['--img-size', '100000'], r'--img-size must be a whole number of pixels in \[1, 8192\]'),
    (['--crop-pct', '100'], r'--crop-pct .* must be in \(0, 1\], got 100.0'),
])
def test_validate_bounds_sizes_naming_the_flag(data, model_dir, capsys, argv, message):
    import re
    with pytest.raises(SystemExit) as e:
        validate_main(['--model', f'local-dir:{model_dir}', '--dataset', str(data), '--cpu', *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err) and err.count('\n') == 1, err
