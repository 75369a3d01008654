"""An exclusive lock on a run folder, held by one run from its first check to its last write.

Two runs must never share an ``--output-dir``: two new runs would interleave checkpoints of different seeds,
an ``--overwrite`` would delete a running run's outputs under it, and two ``--resume`` of one run would write
the same checkpoint names. Every way a run uses a folder (new, ``--overwrite``, ``--resume``) therefore takes
:class:`RunLock` on it first; a second run is refused with the holder's PID and host.

The lock is an ``fcntl.flock`` on the file :data:`LOCK_NAME` inside the folder: the kernel drops it when the
holding process ends in any way (exit, exception, ``kill -9``), so a lock is never left stale. A lock file
left by a killed run is only a file: the next run takes it. Linux emulates ``flock`` with NFS byte-range
locks, so the lock should also hold across machines on an NFS mount with a lock manager (untested here).
The holder writes its PID, host and start time into the file, for the refusal message only (the kernel lock
is what counts).

The standard library has the primitive (``fcntl.flock``); the ``filelock`` package wraps the same call but
records no holder, which the refusal message needs; hence this small module.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List

from .checkpoints import RUN_LOCK
from .runs import OutputDirError

try:  # POSIX; on Windows msvcrt locks the first byte (the holder's record then cannot be read while held)
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ['LOCK_NAME', 'RunFolderInUse', 'RunLock', 'lock_run_folder']

#: the lock file inside a run folder (never counted as a run's output, never removed by ``--overwrite``)
LOCK_NAME = RUN_LOCK


class RunFolderInUse(OutputDirError):
    """Another process holds the run folder: its PID and host are in the message."""


def _holder_text(info: Dict[str, Any]) -> str:
    if not info.get('pid'):
        return 'another process (it has not yet recorded its PID)'
    since = info.get('since')
    when = f', since {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))}' if isinstance(
        since, (int, float)) else ''
    return f'PID {info["pid"]} on host {info.get("host", "?")}{when}'


class RunLock:
    """The exclusive lock on one run folder (see the module docstring).

    Args:
        folder: the run folder; it and its missing parents are created when the lock is taken, and removed
            again on release when the run wrote nothing into them (a refused run leaves no folder behind).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created: List[Path] = []

    @property
    def held(self) -> bool:
        """True between :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def _make_folder(self) -> None:
        out = self.folder
        if out.exists() and not out.is_dir():
            raise OutputDirError('{0} {out} is a file, not a folder', 'output_dir', out=out)
        missing = []
        p = out
        while not p.exists() and p.parent != p:
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise OutputDirError('{0} {out}: {p} is a file, not a folder', 'output_dir', out=out, p=p)
        try:
            for d in reversed(missing):
                try:
                    d.mkdir()
                except FileExistsError:  # another process made it meanwhile (parallel runs): not ours to remove
                    if not d.is_dir():
                        raise
                    continue
                self._created.append(d)
        except OSError as e:
            self._remove_created()
            raise OutputDirError('{0} {out} cannot be written ({p}: {why})', 'output_dir', out=out, p=p,
                                 why=e.strerror or e) from None

    def _remove_created(self) -> None:
        """Remove the folders this lock created, innermost first, where they are empty."""
        for d in reversed(self._created):
            try:
                d.rmdir()
            except OSError:  # the run wrote into it, or another process did: keep it
                break
        self._created = []

    def acquire(self) -> RunLock:
        """Take the lock, or refuse at once (never waits).

        Returns:
            self.

        Raises:
            RunFolderInUse: another process holds it (the message names its PID and host).
            OutputDirError: the folder is a file, or cannot be created or written.
        """
        if self._fd is not None:
            return self
        self._make_folder()
        try:
            while True:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_CLOEXEC', 0), 0o644)
                except OSError as e:
                    raise OutputDirError('{0} {out} cannot be written ({p}: {why})', 'output_dir', out=self.folder,
                                         p=self.path, why=e.strerror or e) from None
                try:
                    _lock_fd(fd)
                except BlockingIOError:
                    info = _read_info(fd)
                    os.close(fd)
                    raise RunFolderInUse(
                        '{0} {out} is in use by another run: {holder}. Two runs never share a run folder (nor does '
                        '{1} or {2} take one from a running run); wait for that run to end, stop it, or choose '
                        'another {0}', 'output_dir', 'overwrite', 'resume', out=self.folder,
                        holder=_holder_text(info)) from None
                except OSError as e:  # ENOLCK / EOPNOTSUPP: a file system without locks (some FUSE or NFS mounts)
                    os.close(fd)
                    if self._created:  # the folder is ours, so is the file: leave nothing behind
                        self.path.unlink(missing_ok=True)
                    raise OutputDirError(
                        '{0} {out}: cannot lock {p} ({why}); the file system does not support file locks, so two '
                        'runs could share the folder. Choose an {0} on a local disk, or an NFS mount with a lock '
                        'manager', 'output_dir', out=self.folder, p=self.path, why=e.strerror or e) from None
                # a run that released the lock unlinks the file; if that happened between our open and our
                # lock, we hold a lock on a file nobody else sees: take the lock on the current file instead
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            info = dict(pid=os.getpid(), host=socket.gethostname(), since=time.time())
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + '\n').encode())
            self._fd = fd
        except BaseException:
            self._remove_created()
            raise
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (and remove the folders it created if they are still empty)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: see the inode check in acquire
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
            self._remove_created()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lock_fd(fd: int) -> None:
    """Exclusive, non-blocking lock on ``fd``; ``BlockingIOError`` when another process holds it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    import msvcrt  # pragma: no cover - Windows
    try:  # pragma: no cover
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:  # pragma: no cover
        raise BlockingIOError(errno.EAGAIN, 'locked') from e


def _read_info(fd: int) -> Dict[str, Any]:
    """What the holder recorded (empty when it has not written yet, or the file is not ours)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode('utf-8', 'replace') or '{}')
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_run_folder(folder: str | os.PathLike, accelerator: Any) -> RunLock:
    """Take the run folder's lock on the main process; every process raises the same refusal (collective).

    Only the main process writes into the run folder, so only it holds the lock; the others learn its answer
    through ``accelerate.utils.broadcast_object_list`` and stop with the same message instead of waiting for it.

    Args:
        folder: the run folder (the ``output_dir`` option).
        accelerator: the run's ``accelerate.Accelerator``.

    Returns:
        The lock (held on the main process, a released one elsewhere); release it when the run ends.

    Raises:
        RunFolderInUse: another process holds the folder.
        OutputDirError: the folder cannot be created or written.
    """
    from accelerate.utils import broadcast_object_list

    lock = RunLock(folder)
    answer: List[Any] = [None]
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except OutputDirError as e:  # the refusal's parts, so every process raises it naming the same options
            answer = [(isinstance(e, RunFolderInUse), e.template, e.options, e.values)]
    if accelerator.num_processes > 1:
        answer = broadcast_object_list(answer)
    if answer[0] is not None:
        in_use, template, options, values = answer[0]
        raise (RunFolderInUse if in_use else OutputDirError)(template, *options, **values)
    return lock
