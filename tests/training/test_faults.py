"""Fault injection (issue 13): the trainer never loses a run, never mixes two runs, and never reports a wrong
number without saying so.

Kill points, every kind of damaged checkpoint file, conflicting resume settings, bad images, bad YAML, and
bad input that must fail before anything is written. Runs are tiny (test_resnet_dropres, 32 px, 12 training
images, 3 steps an epoch) and shared through module fixtures.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import timm
import torch
from helpers_train import PYTHON, make_image_folder, subprocess_env, tiny_config
from PIL import Image
from safetensors.torch import load_file

import timm_dropres.training.trainer as trainer_mod
from timm_dropres.cli._config_args import load_yaml
from timm_dropres.cli.finetune import main as finetune_main
from timm_dropres.cli.validate import main as validate_main
from timm_dropres.models.hf_folder import save_pretrained_folder
from timm_dropres.training.build import resolve_model
from timm_dropres.training.checkpoints import CheckpointError, list_checkpoints
from timm_dropres.training.config import FinetuneConfig, OptionError
from timm_dropres.training.data import DataError, resolve_data
from timm_dropres.training.runs import (
    FREE,
    RECORDED,
    RESUME_RULES,
    SAME,
    OutputDirError,
    TrainingDiverged,
    clean_partial_writes,
)
from timm_dropres.training.trainer import finetune

pytestmark = pytest.mark.usefixtures('one_torch_thread')

DOCS = Path(__file__).resolve().parents[2] / 'docs' / 'training.md'
#: every piece of state exact resume restores is in use: dropout, RandAugment, random erasing, warmup
KW: Dict[str, Any] = dict(epochs=2, res_drop_rate=0.2, aa='rand-m9-mstd0.5', reprob=0.25, warmup_epochs=0.5,
                          checkpoint_every=1, keep_checkpoints=3)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Module fixtures run before the autouse one-thread fixture."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _weights(folder: Path) -> Dict[str, torch.Tensor]:
    return load_file(folder / 'model.safetensors')


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)


def _tree(root: Path) -> Dict[str, int]:
    """Every file under ``root`` with its size: what a refused run must leave untouched."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob('*')) if p.is_file()}


def _one_error_line(err: str, prog: str = 'dropres-finetune') -> str:
    """The CLI's error: one line, the last on stderr (log lines come before it), and no traceback anywhere."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f'{prog}: error: '), err
    assert 'Traceback' not in err, err
    return lines[-1]


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('faults') / 'shapes', n_train=4, n_val=2)


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted-and-resumed run must equal, bit for bit."""
    out = tmp_path_factory.mktemp('ref') / 'run'
    with _one_thread():
        finetune(tiny_config(data, out, **KW))
    return out


@pytest.fixture(scope='module')
def partial(data, tmp_path_factory) -> Path:
    """The same run stopped after 2 of its 6 steps (checkpoints step 1 and 2): what --resume continues."""
    out = tmp_path_factory.mktemp('partial') / 'run'
    with _one_thread():
        finetune(tiny_config(data, out, stop_after_steps=2, **KW))
    return out


@pytest.fixture(scope='module')
def ema_run(data, tmp_path_factory) -> Path:
    """A finished one-epoch run with EMA: checkpoints step 2 and step 3, every file kind a checkpoint has."""
    out = tmp_path_factory.mktemp('ema') / 'run'
    with _one_thread():
        finetune(tiny_config(data, out, ema=True, ema_decay=0.9, checkpoint_every=2))
    assert [p.name for p in list_checkpoints(out)] == ['step_000000002', 'step_000000003']
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------------------------- 1. YAML types


@pytest.mark.parametrize('yaml_text, message', [
    ('overwrite: "false"', r"overwrite: expected true or false, got 'false' \(a string\)"),
    ('epochs: 1.7', 'epochs: expected an integer, got 1.7'),
    ('epochs: null', 'epochs: expected a value, got null'),
    ('batch_size: "many"', "batch_size: expected an integer, got 'many'"),
    ('lr: fast', "lr: expected a number, got 'fast'"),
    ('mixed_precision: fp8', r"mixed_precision: got 'fp8'; valid choices: \['no', 'fp16', 'bf16'\]"),
    ('res_drop_pos: sideways', "res_drop_pos: got 'sideways'; valid choices"),
    ('scale: 0.5', 'scale: expected a list, got 0.5'),
    ('scale: [0.5]', r'scale: expected a list of 2 values, got \[0.5\]'),
    ('model_kwargs: [1, 2]', 'model_kwargs: expected a mapping'),
    ('model: 18', 'model: expected a string, got 18'),
    ('model: [unclosed', r'c.yaml is not valid YAML \(line 4, column 1\): '),
    ('model: a\n  b: c', r'c.yaml is not valid YAML \(line 4, column 4\): mapping values are not allowed here'),
])
def test_yaml_values_get_the_flag_checks(data, tmp_path, capsys, yaml_text, message):
    """``overwrite: "false"`` used to count as true (and delete the previous run); ``epochs: 1.7`` ran 2 epochs."""
    out = tmp_path / 'out'
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(f'dataset: {data}\noutput_dir: {out}\n{yaml_text}\n')
    with pytest.raises(SystemExit) as e:
        finetune_main(['--config', str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(cfg) in err, err
    assert re.search(message, err), err
    assert 'Traceback' not in err and not out.exists()


def test_yaml_values_are_converted_like_the_command_line(tmp_path):
    cfg = tmp_path / 'c.yaml'
    # YAML 1.1 reads 1e-3 as a string; the flag's own type converts it, as on the command line
    cfg.write_text('lr: 1e-3\nepochs: 3\noverwrite: false\nscale: [0.5, 1]\nmodel_kwargs: {stem_width: 8}\n'
                   'drop_rate: null\n')
    values = load_yaml(cfg, FinetuneConfig)
    assert values == dict(lr=0.001, epochs=3, overwrite=False, scale=[0.5, 1.0], model_kwargs=dict(stem_width=8),
                          drop_rate=None)
    assert isinstance(values['lr'], float) and isinstance(values['scale'][1], float)


def test_validate_yaml_is_checked_too(tmp_path, capsys):
    cfg = tmp_path / 'v.yaml'
    cfg.write_text('model: test_resnet_dropres\nbatch_size: 2.5\n')
    with pytest.raises(SystemExit):
        validate_main(['--config', str(cfg)])
    assert 'batch_size: expected an integer, got 2.5' in capsys.readouterr().err


# ------------------------------------------------------------------------- 2, 3, 6. the output folder


def test_overwrite_refuses_a_folder_with_files_a_run_did_not_write(data, partial, tmp_path):
    out = _copy(partial, tmp_path / 'run')
    (out / 'logs').mkdir()
    (out / 'logs' / 'important.log').write_text('keep me')
    (out / 'best').mkdir()
    (out / 'best' / 'notes.md').write_text('mine too')
    before = _tree(out)
    with pytest.raises(OutputDirError, match=r"does not write: \['best/notes.md', 'logs/important.log'\]"):
        finetune(tiny_config(data, out, overwrite=True, **KW))
    assert _tree(out) == before


def test_resume_into_another_run_folder_replaces_it_or_refuses(data, reference, partial, ema_run, tmp_path):
    """--resume A --output-dir B --overwrite with an older run in B: B used to end with the old run's checkpoints,
    best/ and last/ beside A's summary.json. Now B holds exactly A's continuation, equal to an uninterrupted run."""
    b = _copy(ema_run, tmp_path / 'b')
    before = _tree(b)
    with pytest.raises(OutputDirError, match='already holds a run.*pass overwrite'):  # field names: tests/cli
        finetune(tiny_config(data, b, resume=str(partial), **KW))
    assert _tree(b) == before
    s = finetune(tiny_config(data, b, resume=str(partial), overwrite=True, **KW))
    assert s['resumes'] == [dict(checkpoint=str(list_checkpoints(partial)[-1]), step=2, action='fork', changed={})]
    assert [p.name for p in list_checkpoints(b)] == ['step_000000004', 'step_000000005', 'step_000000006']
    for name in ('best', 'last'):
        _assert_same_weights(reference / name, b / name)
    assert not any(p.name == 'ema.safetensors' for p in (b / 'checkpoints').rglob('*'))  # nothing of the old run
    state = json.loads((list_checkpoints(b)[-1] / 'trainer_state.json').read_text())
    assert state['resumes'][0]['action'] == 'fork'


def test_overwrite_with_resume_of_the_same_folder_is_refused(data, partial, tmp_path):
    run = _copy(partial, tmp_path / 'run')
    before = _tree(run)
    with pytest.raises(OutputDirError, match='^overwrite with resume .*which overwrite would delete'):
        finetune(tiny_config(data, run, resume=str(run), overwrite=True, **KW))
    older = list_checkpoints(run)[0]
    with pytest.raises(OutputDirError, match=r"older than the run's latest checkpoints \['step_000000002'\]"):
        finetune(tiny_config(data, run, resume=str(older), **KW))
    tmp_ckpt = run / 'checkpoints' / '.tmp-step_000000003'
    shutil.copytree(older, tmp_ckpt)
    with pytest.raises(CheckpointError, match='write was interrupted'):
        finetune(tiny_config(data, tmp_path / 'other', resume=str(tmp_ckpt), **KW))
    shutil.rmtree(tmp_ckpt)
    assert _tree(run) == before


def test_leftovers_of_interrupted_writes_are_cleaned_on_resume(data, reference, partial, tmp_path):
    run = _copy(partial, tmp_path / 'run')
    (run / 'checkpoints' / '.tmp-step_000000003').mkdir()
    (run / 'checkpoints' / '.tmp-step_000000003' / 'model.safetensors').write_bytes(b'half')
    (run / '.best.dropres-tmp-0a1b2c3d').mkdir()
    (run / '.summary.json.dropres-tmp-4242').write_text('{')
    mine = ['.best.backup', '.logs.mine', '.summary.csv.swp']  # the user's: same prefixes, not the trainer's names
    (run / mine[0]).mkdir()
    for name in mine[1:]:
        (run / name).write_text('keep me')
    finetune(tiny_config(data, run, resume=str(run), **KW))
    assert sorted(p.name for p in run.iterdir()) == mine + ['args.yaml', 'best', 'checkpoints', 'last',
                                                            'summary.csv', 'summary.json']
    assert not [p for p in (run / 'checkpoints').iterdir() if p.name.startswith('.')]
    _assert_same_weights(reference / 'last', run / 'last')


def test_an_export_caught_between_its_two_renames_is_restored(reference, tmp_path):
    run = _copy(reference, tmp_path / 'run')
    os.replace(run / 'best', run / '.best.dropres-old')  # killed after moving the old best aside, before the new
    (run / '.best.dropres-tmp-0a1b2c3d').mkdir()  # ... which was still being written
    assert sorted(clean_partial_writes(run)) == ['.best.dropres-tmp-0a1b2c3d', 'best (restored from .best.dropres-old)']
    _assert_same_weights(reference / 'best', run / 'best')


class _Kill(BaseException):
    """Stands for SIGKILL: not an Exception, so no ``except Exception`` cleanup runs."""


def _kill_on_call(monkeypatch, name: str, n: int, before_kill=None) -> None:
    """Make trainer_mod.<name> die on its n-th call (after ``before_kill`` did a partial write)."""
    real = getattr(trainer_mod, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if before_kill is not None:
                before_kill(*args, **kwargs)
            raise _Kill()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, name, wrapper)


def _half_export(model, out_dir, **kwargs) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists():
        os.replace(out_dir, out_dir.with_name(f'.{out_dir.name}.dropres-old'))
    (out_dir.with_name(f'.{out_dir.name}.dropres-tmp-a1b2c3d4')).mkdir()


@pytest.mark.parametrize('point', ['checkpoint_write', 'best_export', 'summary_write'])
def test_killed_anywhere_then_resumed_equals_an_uninterrupted_run(data, reference, tmp_path, monkeypatch, point):
    run = tmp_path / 'run'
    if point == 'checkpoint_write':  # the 4th trainer_state.json: inside .tmp-step_000000004
        _kill_on_call(monkeypatch, 'write_json_atomic', 4)
    elif point == 'best_export':  # epoch 2's export, between moving the old best/ aside and renaming the new
        _kill_on_call(monkeypatch, 'save_pretrained_folder', 2, before_kill=_half_export)
    else:  # the final summary.json (7th atomic JSON write: 6 checkpoints, then the summary)
        _kill_on_call(monkeypatch, 'write_json_atomic', 7)
    with pytest.raises(_Kill):
        finetune(tiny_config(data, run, **KW))
    monkeypatch.undo()
    done = finetune(tiny_config(data, run, resume=str(run), **KW))
    for name in ('best', 'last'):
        _assert_same_weights(reference / name, run / name)
    ref = json.loads((reference / 'summary.json').read_text())
    assert done['best'] == ref['best'] and [h['top1'] for h in done['history']] == [h['top1'] for h in ref['history']]
    assert not [p for p in run.rglob('.*')], list(run.rglob('.*'))


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(data, reference, tmp_path):
    """A real ``kill -9`` of the CLI at a random point after its third checkpoint."""
    run = tmp_path / 'run'
    argv = ['--model', 'test_resnet_dropres', '--dataset', str(data), '--output-dir', str(run), '--epochs', '2',
            '--batch-size', '4', '--img-size', '32', '--num-workers', '0', '--no-progress', '--lr', '3e-3',
            '--warmup-epochs', '0.5', '--cpu', '--seed', '0', '--res-drop-rate', '0.2', '--aa', 'rand-m9-mstd0.5',
            '--reprob', '0.25', '--checkpoint-every', '1', '--keep-checkpoints', '3']
    code = f'import sys; from timm_dropres.cli.finetune import main; sys.exit(main({argv!r}))'
    proc = subprocess.Popen([PYTHON, '-c', code], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not (run / 'checkpoints' / 'step_000000003').exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finetune(tiny_config(data, run, resume=str(run), **KW))
    for name in ('best', 'last'):
        _assert_same_weights(reference / name, run / name)


# -------------------------------------------------------------------------------- 4. resume settings


def test_resume_refuses_settings_that_break_exact_resume(data, partial):
    before = _tree(partial)
    with pytest.raises(CheckpointError) as e:
        finetune(tiny_config(data, partial, resume=str(partial), **dict(KW, lr=0.1, seed=1, batch_size=2)))
    msg = str(e.value)
    for part in ('lr: checkpoint 0.003, this run 0.1', 'seed: checkpoint 0, this run 1',
                 'batch_size: checkpoint 4, this run 2'):  # by field name; the CLI names flags (tests/cli)
        assert part in msg, msg
    assert _tree(partial) == before


def test_resume_refuses_other_data(data, partial, tmp_path):
    other = _copy(data, tmp_path / 'other')
    for split in ('train', 'val'):
        os.rename(other / split / 'stripes', other / split / 'zebra')
    with pytest.raises(CheckpointError, match=r"classes: checkpoint \['circle', 'square', 'stripes'\], this run "
                                              r"\['circle', 'square', 'zebra'\]"):
        finetune(tiny_config(other, tmp_path / 'o', resume=str(partial), **KW))
    swapped = _copy(data, tmp_path / 'swapped')  # same names and counts, one label changed
    os.rename(swapped / 'train' / 'circle' / 'circle_000.png', swapped / 'train' / 'square' / 'circle_000.png')
    os.rename(swapped / 'train' / 'square' / 'square_000.png', swapped / 'train' / 'circle' / 'square_000.png')
    with pytest.raises(CheckpointError, match='training images or their labels differ'):
        finetune(tiny_config(swapped, tmp_path / 'o', resume=str(partial), **KW))
    assert not (tmp_path / 'o').exists()


def test_resume_allows_and_records_a_longer_run_on_moved_data(data, partial, tmp_path):
    moved = _copy(data, tmp_path / 'moved')
    s = finetune(tiny_config(moved, tmp_path / 'longer', resume=str(partial), **dict(KW, epochs=3,
                                                                                      keep_checkpoints=5)))
    assert s['epochs_completed'] == 3 and s['global_steps'] == 9
    # --dataset and --epochs are recorded; --keep-checkpoints (free) is not
    assert s['resumes'][0]['changed'] == dict(dataset=[str(data), str(moved)], epochs=[2, 3])
    with pytest.raises(CheckpointError, match='run: epochs 2 is fewer than the 3 epochs'):
        finetune(tiny_config(moved, tmp_path / 'longer', resume=str(tmp_path / 'longer'), **KW))


def test_every_option_has_a_resume_rule_and_the_docs_list_them():
    from dataclasses import fields
    assert set(RESUME_RULES) == {f.name for f in fields(FinetuneConfig)}
    assert set(RESUME_RULES.values()) == {SAME, RECORDED, FREE}
    docs = DOCS.read_text()
    table = docs[docs.index('<!-- resume-table -->'):docs.index('<!-- /resume-table -->')]
    for rule, heading in ((SAME, 'refused'), (RECORDED, 'allowed, recorded'), (FREE, 'allowed')):
        row = next(line for line in table.splitlines() if line.startswith(f'| {heading} |'))
        for name, r in RESUME_RULES.items():
            if r == rule:
                assert f'`--{name.replace("_", "-")}`' in row, (name, rule)


# -------------------------------------------------------------------------- 5. damaged checkpoints


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    'truncated': _truncate,
    'empty': lambda p: p.write_bytes(b''),
    'garbage': lambda p: p.write_bytes(os.urandom(256)),
    'missing': lambda p: p.unlink(),
}
CASES = [(f, d) for f in ('model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'ema.safetensors')
         for d in ('truncated', 'empty', 'garbage', 'missing')]


@pytest.mark.parametrize('name, damage', CASES + [
    ('trainer_state.json', 'garbage'), ('trainer_state.json', 'empty'), ('trainer_state.json', 'missing'),
    ('trainer_state.json', 'not_a_state'), ('trainer_state.json', 'wrong_types')])
def test_every_damaged_checkpoint_file_is_refused_naming_the_older_ones(data, ema_run, tmp_path, name, damage):
    """A corrupt random_states_*.pkl used to be ignored (accelerate logs it at INFO and carries on)."""
    run = _copy(ema_run, tmp_path / 'run')
    target = list_checkpoints(run)[-1] / name
    if damage == 'not_a_state':
        target.write_text('[1, 2, 3]')
    elif damage == 'wrong_types':
        state = json.loads(target.read_text())
        target.write_text(json.dumps(dict(state, global_step='3', epoch=-1)))
    else:
        DAMAGE[damage](target)
    before = _tree(run)
    with pytest.raises(CheckpointError, match=r'step_000000003 is corrupt or incomplete: .*older complete '
                                              r"checkpoints of this run: \['step_000000002'\].*: resume "
                                              r'.*step_000000002 output_dir <new folder>$') as e:
        finetune(tiny_config(data, run, resume=str(run), ema=True, ema_decay=0.9, checkpoint_every=2))
    if name == 'random_states_0.pkl' and damage != 'missing':
        assert 'random number generators' in str(e.value)
    assert _tree(run) == before  # nothing written, nothing cleaned up


def test_the_older_checkpoint_named_by_the_error_resumes(data, ema_run, tmp_path):
    run = _copy(ema_run, tmp_path / 'run')
    (list_checkpoints(run)[-1] / 'random_states_0.pkl').write_bytes(b'\x80\x04garbage')
    with pytest.raises(CheckpointError):
        finetune(tiny_config(data, run, resume=str(run), ema=True, ema_decay=0.9, checkpoint_every=2))
    s = finetune(tiny_config(data, tmp_path / 'again', resume=str(list_checkpoints(run)[0]), ema=True,
                             ema_decay=0.9, checkpoint_every=2))
    _assert_same_weights(ema_run / 'last', tmp_path / 'again' / 'last')
    assert s['resumes'][0]['step'] == 2


# ----------------------------------------------------------------------------------- 7. divergence


def test_divergence_stops_with_the_last_good_checkpoint_and_exit_1(data, tmp_path, capsys):
    out = tmp_path / 'nan'
    argv = ['--model', 'test_resnet_dropres', '--dataset', str(data), '--output-dir', str(out), '--epochs', '2',
            '--batch-size', '4', '--img-size', '32', '--num-workers', '0', '--no-progress', '--cpu',
            '--warmup-epochs', '0', '--opt', 'sgd', '--lr', '1e30', '--checkpoint-every', '1']
    assert finetune_main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert 'training diverged: the training loss is NaN or infinite from step' in line
    assert not (out / 'best').exists() and not (out / 'last').exists() and not (out / 'summary.json').exists()
    ckpts = list_checkpoints(out)
    assert ckpts and f'the last good checkpoint is {ckpts[-1]}' in line, line  # step 1's loss was still finite
    for ckpt in ckpts:
        assert all(torch.isfinite(t).all() for t in _weights(ckpt).values()), ckpt
    with pytest.raises(TrainingDiverged):
        finetune(tiny_config(data, tmp_path / 'lib', opt='sgd', lr=1e30, warmup_epochs=0))


# --------------------------------------------------------------------------------- 8-10. the data


def _png_bytes(mode: str = 'RGB', size: int = 32) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buf, format='PNG')
    return buf.getvalue()


@pytest.mark.parametrize('kind', ['empty', 'garbage'])
def test_unreadable_images_fail_before_anything_is_written(data, tmp_path, kind):
    """The first training image included: it used to end in a PIL.UnidentifiedImageError traceback."""
    ds = _copy(data, tmp_path / 'ds')
    bad = ds / 'train' / 'circle' / 'aaa_first.png'
    bad.write_bytes(b'' if kind == 'empty' else b'not an image at all')
    with pytest.raises(DataError, match=rf'1 of 13 files in .*cannot be read as images: {re.escape(str(bad))} '
                                        r'\(UnidentifiedImageError'):
        finetune(tiny_config(ds, tmp_path / 'o'))
    assert not (tmp_path / 'o').exists()


def test_a_truncated_image_is_named_never_replaced_by_its_neighbour(data, tmp_path, capsys):
    """timm's loader warned and returned the next sample instead: validation counted 31 images for 30."""
    ds = _copy(data, tmp_path / 'ds')
    bad = ds / 'val' / 'square' / 'square_001.png'
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # the header reads; the pixels do not
    model = save_pretrained_folder(timm.create_model('test_resnet_dropres', num_classes=3), tmp_path / 'best',
                                   label_names=['circle', 'square', 'stripes'])
    for workers in ('0', '2'):  # in a worker, the error comes back wrapped in the worker's traceback
        rc = validate_main(['--model', f'local-dir:{model}', '--dataset', str(ds), '--num-workers', workers,
                            '--cpu', '--batch-size', '2'])
        line = _one_error_line(capsys.readouterr().err, 'dropres-validate')
        assert rc == 2 and f'cannot read image {bad}: OSError: image file is truncated' in line, line


def test_channels_come_from_every_image_not_the_first_ones(tmp_path):
    root = tmp_path / 'mixed'
    for c in ('a', 'b'):
        (root / c).mkdir(parents=True)
        for i in range(18):  # 17 gray files sort first in class a, then colour
            mode = 'L' if (c == 'a' and i < 17) else 'RGB'
            (root / c / f'{c}_{i:03d}.png').write_bytes(_png_bytes(mode, 8))
    b = resolve_data(str(root), val_fraction=0.2)
    assert b.in_chans == 3 and b.info['image_mode'] == 'RGB'
    assert all(b.train[i][0].mode == 'RGB' for i in range(len(b.train)))
    gray = tmp_path / 'gray'
    for c in ('a', 'b'):
        (gray / c).mkdir(parents=True)
        for i in range(3):
            (gray / c / f'{i}.png').write_bytes(_png_bytes('L', 8))
    assert resolve_data(str(gray), val_fraction=0.34).in_chans == 1


def test_a_single_class_dataset_is_refused(tmp_path):
    ds = make_image_folder(tmp_path / 'one', 4, 2, classes=('circle',))
    with pytest.raises(DataError, match=r"1 class \(\['circle'\]\); a classifier needs at least 2 classes"):
        finetune(tiny_config(ds, tmp_path / 'o'))
    assert not (tmp_path / 'o').exists()


# --------------------------------------------------------- 11, 12. clear errors, before anything is written


@pytest.mark.parametrize('kw, message', [
    (dict(lr=float('nan')), '^lr must be a finite number, got nan'),
    (dict(lr=float('inf')), '^lr must be a finite number, got inf'),
    (dict(weight_decay=-0.05), '^weight_decay must be >= 0, got -0.05'),
    (dict(scale=[0.5, float('inf')]), '^scale must be a finite number'),
    (dict(reprob=1.5), r'^reprob must be in \[0, 1\], got 1.5'),
    (dict(eval_batch_size=0), '^eval_batch_size must be > 0, got 0'),
])
def test_bad_values_are_refused_by_the_config(data, tmp_path, kw, message):
    with pytest.raises(OptionError, match=message):  # in library terms: the options' field names
        tiny_config(data, tmp_path / 'o', **kw)


def test_an_unknown_tag_is_refused_before_anything_is_written(data, tmp_path):
    cfg = tiny_config(data, tmp_path / 'o', model='resnet18_dropres.not_a_tag')  # a value check passes
    with pytest.raises(OptionError, match=r"unknown pretrained tag 'not_a_tag' for resnet18_dropres .*a1_in1k"):
        resolve_model(cfg)  # the model checks, which finetune runs first
    with pytest.raises(OptionError, match=r"unknown pretrained tag 'not_a_tag'"):
        finetune(cfg)
    assert not (tmp_path / 'o').exists()


def test_cli_bad_values_exit_2_naming_the_flag(data, tmp_path, capsys):
    for argv, message in ((['--lr', 'nan'], '--lr must be a finite number, got nan'),
                          (['--model', 'resnet18_dropres.not_a_tag'], "unknown pretrained tag 'not_a_tag'")):
        with pytest.raises(SystemExit) as e:
            finetune_main(['--dataset', str(data), '--output-dir', str(tmp_path / 'o'), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert validate_main(['--model', 'resnet18_dropres.not_a_tag', '--dataset', str(data)]) == 2
    assert "unknown pretrained tag 'not_a_tag'" in _one_error_line(capsys.readouterr().err, 'dropres-validate')
    assert not (tmp_path / 'o').exists()


def test_an_impossible_batch_size_fails_before_anything_is_written(data, tmp_path):
    with pytest.raises(ValueError, match=r'12 images, fewer than one global batch .*at most 12'):
        finetune(tiny_config(data, tmp_path / 'o', batch_size=16))
    assert not (tmp_path / 'o').exists()  # so the corrected rerun is not refused


def test_output_dir_that_is_a_file_or_unwritable(data, tmp_path, capsys):
    f = tmp_path / 'file'
    f.write_text('x')
    base = ['--model', 'test_resnet_dropres', '--dataset', str(data), '--cpu', '--num-workers', '0',
            '--batch-size', '4', '--img-size', '32', '--epochs', '1']
    assert finetune_main(base + ['--output-dir', str(f)]) == 2
    assert 'is a file, not a folder' in _one_error_line(capsys.readouterr().err)
    assert finetune_main(base + ['--output-dir', str(f / 'sub')]) == 2
    assert 'is a file, not a folder' in _one_error_line(capsys.readouterr().err)
    if Path('/sys/kernel').is_dir():  # Linux: sysfs refuses mkdir, even to root (whom os.access always answers yes)
        assert finetune_main(base + ['--output-dir', '/sys/dropres-test/run']) == 2
        assert 'cannot be written (/sys: Operation not permitted)' in _one_error_line(capsys.readouterr().err)
    if os.geteuid() != 0:  # a read-only folder stops only non-root users
        ro = tmp_path / 'ro'
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert finetune_main(base + ['--output-dir', str(ro / 'run')]) == 2
            assert 'cannot be written' in _one_error_line(capsys.readouterr().err)
        finally:
            ro.chmod(0o755)


def test_disk_full_while_checkpointing_exits_1_keeping_earlier_checkpoints(data, tmp_path, monkeypatch, capsys):
    real = trainer_mod.write_json_atomic
    calls = []

    def second_fails(path, obj, **kw):  # the second checkpoint's trainer_state.json meets a full disk
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj, **kw)

    monkeypatch.setattr(trainer_mod, 'write_json_atomic', second_fails)
    out = tmp_path / 'full'
    rc = finetune_main(['--model', 'test_resnet_dropres', '--dataset', str(data), '--output-dir', str(out), '--cpu',
                        '--num-workers', '0', '--batch-size', '4', '--img-size', '32', '--epochs', '1',
                        '--checkpoint-every', '1', '--no-progress'])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 1 and 'cannot write checkpoint' in line and 'No space left on device' in line, line
    assert [p.name for p in (out / 'checkpoints').iterdir()] == ['step_000000001']  # no .tmp- left behind


class _NotATensor:
    """What a training script may pickle beside its weights: torch.load(weights_only=True) refuses it."""


def test_validate_refuses_unloadable_folders_in_one_line(data, tmp_path, capsys):
    model = timm.create_model('test_resnet_dropres', num_classes=3)
    good = save_pretrained_folder(model, tmp_path / 'good', label_names=['circle', 'square', 'stripes'])
    cases = {}
    for name, arch in (('unknown', 'nonexistent_net'), ('plain', 'test_resnet')):
        d = _copy(good, tmp_path / name)
        cfg = json.loads((d / 'config.json').read_text())
        cfg['architecture'] = arch
        (d / 'config.json').write_text(json.dumps(cfg))
        cases[name] = d
    pickled = _copy(good, tmp_path / 'pickled')  # a .bin whose pickle holds more than tensors
    (pickled / 'model.safetensors').unlink()
    torch.save({'state_dict': model.state_dict(), 'args': _NotATensor()}, pickled / 'pytorch_model.bin')
    expected = dict(unknown="architecture 'nonexistent_net' is not a registered timm model",
                    plain="cannot build local-dir:.*unexpected keyword argument 'res_drop_pos'",
                    pickled=r'torch.load\(weights_only=True\) refused them')
    for name, folder in dict(cases, pickled=pickled).items():
        rc = validate_main(['--model', f'local-dir:{folder}', '--dataset', str(data), '--num-workers', '0', '--cpu'])
        line = _one_error_line(capsys.readouterr().err, 'dropres-validate')
        assert rc == 2 and re.search(expected[name], line), (name, line)
    # the same pickle as --pretrained-file: refused safely, in one line, before anything is written
    rc = finetune_main(['--model', 'test_resnet_dropres', '--dataset', str(data), '--output-dir', str(tmp_path / 'o'),
                        '--pretrained-file', str(pickled / 'pytorch_model.bin'), '--cpu', '--num-workers', '0',
                        '--batch-size', '4', '--img-size', '32'])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and 'refused them' in line and 'never arbitrary pickles' in line, line
    assert not (tmp_path / 'o').exists()
