"""Atomic file writes and checked JSON reads, shared by every layer.

A file the project writes is either complete or absent: it is written to a hidden temporary name in the same
folder and moved into place with ``os.replace`` (atomic on POSIX and Windows). Neither the standard library
nor the ecosystem libraries offer this for text/JSON, hence these few lines.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ['write_text_atomic', 'write_json_atomic', 'read_json', 'temp_dir_beside', 'files_like_folder']


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (creating parent folders).

    Args:
        path: destination file.
        text: its content (UTF-8).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        tmp.write_text(text, encoding='utf-8')
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """Create a new, empty, hidden folder next to ``path``, to be renamed onto it once complete.

    Unlike ``tempfile.mkdtemp`` (always mode 0700), the folder gets the mode a plain ``mkdir`` gives
    (0777 less the process umask), so a folder renamed into place is as readable as any other the user
    creates.

    Args:
        path: the final destination; its parent folder is created if missing.

    Returns:
        The new folder, ``<parent>/.<name>.<random>``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f'.{path.name}.{secrets.token_hex(4)}')
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def files_like_folder(folder: str | os.PathLike) -> None:
    """Give the files directly in ``folder`` the folder's read/write bits (its mode less execute bits).

    Some writers (safetensors among them) create files with mode 0600 whatever the umask; after this, the
    files of a folder made by :func:`temp_dir_beside` are as readable as files the user creates.

    Args:
        folder: the folder whose files to adjust (not recursive).
    """
    folder = Path(folder)
    mode = folder.stat().st_mode & 0o666
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            p.chmod(mode)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (non-JSON values via ``str``) to ``path`` atomically.

    Example:
        >>> write_json_atomic('/tmp/x.json', {'top1': 91.2})  # doctest: +SKIP
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + '\n')


def read_json(path: str | os.PathLike, what: str = 'JSON file') -> Any:
    """Read JSON from ``path``; a missing, unreadable or malformed file raises ``ValueError`` naming it.

    Args:
        path: the file.
        what: how the error names the file (e.g. ``'run record'``).

    Raises:
        ValueError: with the path and the reason.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError as e:
        raise ValueError(f'{what} {path} does not exist') from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{what} {path} cannot be read: {e}') from e
