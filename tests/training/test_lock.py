"""The run-folder lock (issue 20): one run owns its folder, new, --overwrite and --resume alike.

The holder is always a second, real process: a child Python that takes the lock and waits, or the CLI run as a
child while this process holds the lock.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Dict

import pytest
from helpers_train import PYTHON, make_image_folder, subprocess_env, tiny_config

from timm_dropres.training.checkpoints import RUN_LOCK, list_checkpoints
from timm_dropres.training.lock import RunFolderInUse, RunLock
from timm_dropres.training.runs import OutputDirError
from timm_dropres.training.trainer import finetune

pytestmark = pytest.mark.usefixtures('one_torch_thread')

_HOLD = """
import sys
from timm_dropres.training.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print('held', flush=True)
sys.stdin.read()  # hold until the test closes our stdin
lock.release()
"""


def _tree(root: Path) -> Dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture
def holder():
    """Start a child process holding the lock of a folder; yields a function folder -> the child."""
    children = []

    def hold(folder: Path) -> subprocess.Popen:
        child = subprocess.Popen([PYTHON, '-c', _HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=subprocess_env(), text=True)
        children.append(child)
        assert child.stdout.readline().strip() == 'held'
        return child

    yield hold
    for child in children:
        child.stdin.close()
        child.wait(timeout=60)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('lock') / 'shapes', n_train=4, n_val=2)


@pytest.fixture(scope='module')
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('finished') / 'run'
    finetune(tiny_config(data, out, checkpoint_every=1))
    assert not (out / RUN_LOCK).exists()  # released, and its file removed, when the run ends
    return out


def test_a_run_folder_held_by_another_process_is_refused_every_way(data, finished, tmp_path, holder):
    run = tmp_path / 'run'
    shutil.copytree(finished, run)
    child = holder(run)
    before = _tree(run)
    who = rf'in use by another run: PID {child.pid} on host {socket.gethostname()}, since '
    for kw in (dict(), dict(overwrite=True), dict(resume=str(run)), dict(resume=str(finished), overwrite=True)):
        with pytest.raises(RunFolderInUse, match=who):
            finetune(tiny_config(data, run, checkpoint_every=1, epochs=2, **kw))
        assert _tree(run) == before, kw  # --overwrite deleted nothing; the holder's lock file is still there
    child.stdin.close()
    child.wait(timeout=60)
    s = finetune(tiny_config(data, run, checkpoint_every=1, epochs=2, resume=str(run)))  # the holder is gone
    assert s['epochs_completed'] == 2 and not (run / RUN_LOCK).exists()


def test_a_new_folder_held_by_another_process_is_left_to_it(data, tmp_path, holder):
    run = tmp_path / 'new' / 'run'
    holder(run)
    with pytest.raises(RunFolderInUse, match='PID'):
        finetune(tiny_config(data, run))
    assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]


def test_the_cli_refuses_in_one_line_naming_the_holder(data, tmp_path):
    """This process holds the lock; the CLI, a second process, is refused with exit 2."""
    run = tmp_path / 'run'
    with RunLock(run):
        proc = subprocess.run(
            [PYTHON, '-m', 'timm_dropres.cli.finetune', '--model', 'test_resnet_dropres', '--dataset', str(data),
             '--output-dir', str(run), '--cpu', '--num-workers', '0', '--batch-size', '4', '--img-size', '32',
             '--epochs', '1', '--overwrite'], env=subprocess_env(), capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
        assert lines[-1].startswith(f'dropres-finetune: error: --output-dir {run} is in use by another run: '
                                    f'PID {os.getpid()} on host {socket.gethostname()}'), lines[-1]
        assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]
    assert not run.exists()  # the lock created the folder and removes it again: nothing else was written


def test_a_refused_run_leaves_no_folder_and_the_lock_is_taken_again(data, tmp_path):
    with pytest.raises(ValueError, match='fewer than one global batch'):
        finetune(tiny_config(data, tmp_path / 'a' / 'o', batch_size=16))
    assert not (tmp_path / 'a').exists()
    lock = RunLock(tmp_path / 'b').acquire()
    with pytest.raises(RunFolderInUse, match=f'PID {os.getpid()}'):  # a second lock, even in one process
        RunLock(tmp_path / 'b').acquire()
    lock.release()
    RunLock(tmp_path / 'b').acquire().release()


def test_a_stale_lock_file_of_a_killed_run_does_not_block(data, tmp_path):
    run = tmp_path / 'run'
    child = subprocess.Popen([PYTHON, '-c', _HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=subprocess_env(), text=True)
    assert child.stdout.readline().strip() == 'held'
    child.kill()  # kill -9: the kernel drops the lock; its file stays
    child.wait(timeout=60)
    child.stdin.close()
    assert (run / RUN_LOCK).is_file()
    finetune(tiny_config(data, run, checkpoint_every=1))
    assert list_checkpoints(run) and not (run / RUN_LOCK).exists()


def test_an_unwritable_output_dir_is_refused_by_the_lock(tmp_path):
    f = tmp_path / 'file'
    f.write_text('x')
    with pytest.raises(OutputDirError, match='is a file, not a folder'):
        RunLock(f / 'run').acquire()


def test_a_file_system_without_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    import errno

    import timm_dropres.training.lock as lock_mod

    def no_locks(fd: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_mod, '_lock_fd', no_locks)
    with pytest.raises(OutputDirError, match='No locks available.*does not support file locks'):
        RunLock(tmp_path / 'run').acquire()
    assert not (tmp_path / 'run').exists()


def test_a_parent_made_by_a_parallel_run_meanwhile_is_used_and_kept(tmp_path, monkeypatch):
    """Study workers start runs side by side under one missing parent: the one that loses the race to create it
    takes the lock all the same, and does not remove the folder on release (it is not its own)."""
    parent, real_mkdir = tmp_path / 'work' / 'arch', Path.mkdir

    def racing_mkdir(self, *args, **kwargs):
        if self == parent:  # another worker creates it between our exists() check and our mkdir()
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, 'mkdir', racing_mkdir)
    lock = RunLock(parent / 'run').acquire()
    monkeypatch.setattr(Path, 'mkdir', real_mkdir)
    assert lock.held and (parent / 'run').is_dir()
    lock.release()
    assert parent.is_dir() and not (parent / 'run').exists()
