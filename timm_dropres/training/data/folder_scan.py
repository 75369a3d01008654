"""The image files of an ImageFolder split, read exactly as the user laid them out.

A split folder holds one level of class folders; every image anywhere under a class folder belongs to that
class, subfolders included (``train/cat/indoor/x.png`` is a cat), as torchvision's ``ImageFolder`` reads it.
timm's folder reader instead labels an image with its innermost folder's name, so a subfolder's images
were given the subfolder's name or silently dropped; and it follows symbolic links without noticing a
loop, so ``train/a/loop -> ..`` turned 36 images into 1476. Here a folder reached twice (a symlink loop, or
two links to one folder) is refused with its path, and images outside any class folder are named in a
warning, never used and never silently dropped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence, Set, Tuple

from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key

__all__ = ['FolderLayoutError', 'class_folder_samples']

_logger = logging.getLogger(__name__)


class FolderLayoutError(ValueError):
    """An ImageFolder split that cannot be read as laid out: a symlink loop, or a folder reached twice."""


def _walk_class(class_dir: Path, seen: Dict[Tuple[int, int], str], exts: Set[str]) -> Tuple[List[str], int]:
    """Every image file under ``class_dir`` (following symbolic links), and how many sit in subfolders.

    Raises:
        FolderLayoutError: a folder is reached a second time (``seen`` holds every folder met so far).
    """
    files: List[str] = []
    nested = 0
    stack: List[Tuple[str, str | None]] = [(str(class_dir), None)]  # (folder, the symbolic link that led there)
    while stack:
        top, via = stack.pop()
        via = top if os.path.islink(top) else via
        st = os.stat(top)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            link = f' (through the symbolic link {via} -> {os.readlink(via)})' if via else ''
            raise FolderLayoutError(
                f'{top}{link} leads to a folder already read as {seen[key]}: a symbolic link loop or a second link '
                f'to the same images, which would use them twice. Remove the link, or copy the images')
        seen[key] = top
        with os.scandir(top) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=True):
                    stack.append((entry.path, via))
                elif os.path.splitext(entry.name)[1].lower() in exts and entry.is_file(follow_symlinks=True):
                    files.append(entry.path)
                    nested += top != str(class_dir)
    return files, nested


def class_folder_samples(folder: str | os.PathLike, class_map: Dict[str, int]) -> List[Tuple[str, int]]:
    """``(image path, class index)`` for every image under the class folders of ``folder`` named in ``class_map``.

    Args:
        folder: the split folder (``root/train``, ``root/val`` or ``root``).
        class_map: class folder name -> class index; class folders not in it are not read.

    Returns:
        The samples, sorted by path in timm's natural order (as its folder reader sorts them).

    Raises:
        FolderLayoutError: a symbolic link loop, or a folder reached twice.
    """
    folder = Path(folder)
    exts = set(get_img_extensions(as_set=True))
    st = os.stat(folder)
    seen: Dict[Tuple[int, int], str] = {(st.st_dev, st.st_ino): str(folder)}  # a link back to the split is a loop
    samples: List[Tuple[str, int]] = []
    nested: Dict[str, int] = {}
    for name in sorted(class_map, key=natural_key):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        files, n_nested = _walk_class(class_dir, seen, exts)
        samples += [(f, class_map[name]) for f in files]
        if n_nested:
            nested[name] = n_nested
    if nested:
        _logger.info('%s: %d images sit in subfolders of class folders and are labelled with their class folder '
                     '(%s)', folder, sum(nested.values()), ', '.join(f'{c}: {n}' for c, n in nested.items()))
    loose = _loose_images(folder, exts)
    if loose:
        _logger.warning('%s: %d image(s) outside any class folder are not used: %s', folder, len(loose),
                        loose[:5] + (['...'] if len(loose) > 5 else []))
    return sorted(samples, key=lambda s: natural_key(s[0]))


def _loose_images(folder: Path, exts: Sequence[str]) -> List[str]:
    """Images directly in the split folder (beside the class folders): no class says what they are."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
