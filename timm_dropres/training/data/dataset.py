"""Dataset classes: in-memory tensors, image files, remapped and subset views, and the epoch-seeded wrapper
that makes augmentation resumable.
"""
from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ...errors import OptionError


class DataError(OptionError):
    """Bad dataset input: a missing path, an empty class folder, inconsistent class sets.

    A message that names an option names it by its field name (:class:`~timm_dropres.errors.OptionError`).
    """


@dataclass
class DataBundle:
    """What the trainer needs to know about the data: two untransformed datasets and their labels.

    The datasets return ``(PIL image or CHW tensor, int target)`` and are wrapped with transforms
    later, once the model's data config is known.
    """
    train: Dataset | None
    val: Dataset
    label_names: List[str]
    in_chans: int
    description: str = ''
    #: True when samples are already-normalised CHW tensors at model resolution (no transforms applied).
    preprocessed: bool = False
    info: Dict[str, Any] = field(default_factory=dict)
    #: preprocessed data only: a random transform of one training tensor (e.g. crop and flip on tensors), seeded
    #: per sample by :class:`EpochSeededDataset` like any other augmentation; None: no augmentation.
    train_transform: Callable | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


class TensorImageDataset(Dataset):
    """In-memory images as a dataset.

    ``uint8`` arrays ``[N, H, W]`` or ``[N, H, W, C]`` become PIL images (so timm's transforms apply);
    float tensors ``[N, C, H, W]`` are returned as they are (already preprocessed).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> None:
        if len(images) != len(targets):
            raise DataError(f'{len(images)} images but {len(targets)} targets')
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.as_pil = images.dtype == torch.uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = self.images[index]
        if self.as_pil:
            img = Image.fromarray(img.numpy())
        return img, int(self.targets[index])


class ImageFiles(Dataset):
    """Image files with their class index, read with PIL and converted to one mode (``'RGB'`` or ``'L'``).

    timm's ``ImageDataset`` logs a warning for an unreadable file and returns the next sample in its place,
    so a corrupt image is silently counted twice. Here an unreadable file raises :class:`DataError` naming
    it: every image is used exactly once, or the run stops and says which file is bad.
    """

    def __init__(self, root: str | os.PathLike, samples: Sequence[Tuple[str, int]], mode: str) -> None:
        """Args:
            root: the folder the samples were found in (file names are reported relative to it).
            samples: ``(path, class index)`` pairs.
            mode: the PIL mode every image is converted to.
        """
        self.root, self.mode = Path(root), mode
        self.samples = [(str(p), int(t)) for p, t in samples]
        self.targets_list = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """The file of sample ``index`` (as timm's ``ImageDataset.filename``).

        Args:
            index: the sample.
            basename: only the file name.
            absolute: the full path; otherwise relative to ``root``.

        Returns:
            The path, as a string.
        """
        path = self.samples[index][0]
        if basename:
            return os.path.basename(path)
        return path if absolute else os.path.relpath(path, self.root)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise DataError(f'cannot read image {path}: {type(e).__name__}: {e}') from e
        return img, target


def scan_images(paths: Sequence[str], what: str = 'images') -> List[str]:
    """The PIL mode of every file in ``paths``, from the headers only (PIL opens lazily; threads hide the I/O).

    Args:
        paths: the image files.
        what: how the error names them (e.g. the dataset folder).

    Returns:
        The modes, in ``paths`` order.

    Raises:
        DataError: files PIL cannot identify (empty, not an image, a damaged header), all named up to ten.
    """
    def head(path: str) -> Tuple[str | None, str | None]:
        try:
            with Image.open(path) as im:
                return im.mode, None
        except Exception as e:  # noqa: BLE001 - reported below, with the file
            return None, f'{type(e).__name__}: {e}'

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        results = list(pool.map(head, paths))
    bad = [(p, err) for p, (_, err) in zip(paths, results, strict=True) if err is not None]
    if bad:
        shown = '; '.join(f'{p} ({err})' for p, err in bad[:10]) + (f'; ... {len(bad) - 10} more' if len(bad) > 10
                                                                   else '')
        raise DataError(f'{len(bad)} of {len(paths)} files in {what} cannot be read as images: {shown}. Every '
                        f'image is used exactly once (none is skipped or replaced), so delete or repair these files')
    return [m for m, _ in results]


class _Remapped(Dataset):
    """Targets passed through a lookup table (dataset class order -> model class order)."""

    def __init__(self, base: Dataset, table: Sequence[int]) -> None:
        self.base, self.table = base, list(table)
        if hasattr(base, 'targets_list'):
            self.targets_list = [self.table[t] for t in base.targets_list]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, target = self.base[index]
        return img, self.table[int(target)]


class _Subset(Dataset):
    """``torch.utils.data.Subset`` that also carries the targets, so subsets of subsets stay stratifiable."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)
        base_targets = _targets(base)
        if base_targets is not None:
            self.targets_list = [base_targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        return self.base[self.indices[index]]


class TransformedDataset(Dataset):
    """Apply a deterministic (eval) transform; ``None`` passes samples through."""

    def __init__(self, base: Dataset, transform: Callable | None) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, target = self.base[index]
        return (img if self.transform is None else self.transform(img)), int(target)


class EpochSeededDataset(Dataset):
    """Apply ``transform`` with RNG seeded from ``(seed, epoch, index)``; restore the global RNG after.

    Random augmentations then depend only on which sample in which epoch, not on worker count or on
    where a run was resumed, and loading data never consumes the global RNG that dropout uses.
    """

    def __init__(self, base: Dataset, transform: Callable | None, seed: int = 0) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Seed the next pass's augmentations from ``epoch``.

        Args:
            epoch: the epoch about to start (0-based).
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _sample_seed(self, index: int) -> int:
        key = f'{self.seed}:{self.epoch}:{index}'.encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), 'little') & (2 ** 63 - 1)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, target = self.base[index]
        if self.transform is None:
            return img, int(target)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        s = self._sample_seed(index)
        random.seed(s)
        np.random.seed(s & (2 ** 32 - 1))
        torch.default_generator.manual_seed(s)
        try:
            img = self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
        return img, int(target)


class EpochSeededSampler(Sampler[int]):
    """A shuffle whose order is a pure function of ``(seed, epoch)``: resumable and identical on every process."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next pass's order from ``epoch``.

        Args:
            epoch: the epoch about to start (0-based).
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())



def _targets(ds: Dataset) -> List[int] | None:
    """The targets of ``ds`` without decoding images, when the dataset exposes them."""
    if hasattr(ds, 'targets_list'):
        return list(ds.targets_list)
    if isinstance(ds, TensorImageDataset):
        return ds.targets.tolist()
    reader = getattr(ds, 'reader', None)
    if reader is not None and hasattr(reader, 'samples'):
        return [int(t) for _, t in reader.samples]
    targets = getattr(ds, 'targets', None)
    if targets is not None:
        return [int(t) for t in targets]
    return None


