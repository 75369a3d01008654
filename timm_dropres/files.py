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

__all__ = ['TEMP_MARKER', 'REPLACED_MARKER', 'write_text_atomic', 'write_json_atomic', 'read_json', 'temp_dir_beside',
           'files_like_folder', 'replaced_name']

#: every temporary name written here is ``.<name>.dropres-tmp-<hex or pid>``: cleanup of interrupted writes
#: matches exactly this, so a user's ``.best.backup`` or an editor's ``.summary.csv.swp`` is never touched
TEMP_MARKER = 'dropres-tmp'
#: a folder replaced in place is first renamed to ``.<name>.dropres-old`` (see :func:`replaced_name`)
REPLACED_MARKER = 'dropres-old'


def replaced_name(path: str | os.PathLike) -> Path:
    """Where a folder being replaced in place waits, between its two renames: ``.<name>.dropres-old``."""
    path = Path(path)
    return path.with_name(f'.{path.name}.{REPLACED_MARKER}')


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, so a reader sees the old file or the new one, never half of it.

    The text goes to a hidden temporary file in the same folder (``.<name>.dropres-tmp-<pid>``), which is then moved
    over ``path`` with ``os.replace``. Missing parent folders are created.

    Args:
        path: destination file.
        text: its content, written as UTF-8.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: if the folder cannot be created or the file cannot be written; the temporary file is
            removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{TEMP_MARKER}-{os.getpid()}')
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
        The new folder, ``<parent>/.<name>.dropres-tmp-<8 random hex digits>``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f'.{path.name}.{TEMP_MARKER}-{secrets.token_hex(4)}')
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
    """Write ``obj`` as JSON to ``path`` atomically (see ``write_text_atomic``), ending with a newline.

    Values JSON cannot represent (``Path``, ``torch.dtype``, ...) are written as their ``str``, so a run
    record never fails to save because of one odd field.

    Args:
        path: destination file; missing parent folders are created.
        obj: the JSON-serialisable value to write.
        indent: indentation of the JSON text.
        sort_keys: sort the keys of every mapping (stable, diff-friendly files).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: if the folder cannot be created or the file cannot be written.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as d:
        ...     out = write_json_atomic(Path(d) / 'run.json', {'top1': 91.2})
        ...     print(out.read_text(), end='')
        {
          "top1": 91.2
        }
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + '\n')


def read_json(path: str | os.PathLike, what: str = 'JSON file') -> Any:
    """Read JSON from ``path``, turning every failure into one ``ValueError`` that names the file.

    Callers then need a single ``except ValueError`` to report a missing, unreadable or malformed file
    with its path and the reason.

    Args:
        path: the file (UTF-8 JSON).
        what: how the error message names the file, e.g. ``'run record'``.

    Returns:
        The decoded JSON value.

    Raises:
        ValueError: if the file does not exist, cannot be read or decoded as UTF-8, or is not valid JSON;
            the message holds ``what``, the path and the reason.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError as e:
        raise ValueError(f'{what} {path} does not exist') from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{what} {path} cannot be read: {e}') from e
