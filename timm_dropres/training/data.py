"""Datasets and loaders for fine-tuning: resolve what the user named into train/val datasets.

Three kinds of ``dataset`` are understood:

* a folder path (ImageFolder): ``root/train/<class>/*`` and ``root/val/<class>/*`` (``validation``,
  ``valid``, ``test`` also accepted for val), or class folders directly under ``root`` / ``root/train``
  with a seeded, stratified hold-out fraction for validation;
* a name timm's ``create_dataset`` understands (``torch/cifar10``, ``torch/fashion_mnist``, ``hfds/...``);
* ``fashion_mnist`` (alias ``fmnist``): Debian's ``dataset-fashion-mnist`` via :mod:`timm_dropres.fmnist`,
  found without any flag.

Class count, label names and input channels are inferred from the data. Transforms and Mixup come from
timm. The one hand-written piece is :class:`EpochSeededDataset`: it seeds each sample's augmentation
from ``(seed, epoch, index)`` so that a resumed run sees exactly the augmentations an uninterrupted
run would have seen, whatever the worker count (timm/torch have no such wrapper).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import Mixup, create_dataset, create_transform, resolve_model_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.transforms import str_to_interp_mode
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset, Sampler

from . import fmnist
from .folder_scan import FolderLayoutError, class_folder_samples

__all__ = [
    'DataBundle', 'DataError', 'ImageFiles', 'EpochSeededDataset', 'TransformedDataset', 'EpochSeededSampler',
    'TensorImageDataset',
    'FMNIST_NAMES', 'TIMM_PREFIXES', 'VAL_FOLDERS', 'TRAIN_FOLDERS',
    'resolve_data', 'subset', 'resolve_transforms', 'create_mixup', 'train_loader', 'eval_loader',
    'dataset_kind', 'image_folder_classes', 'scan_images', 'data_signature', 'channel_stats',
]

_logger = logging.getLogger(__name__)

FMNIST_NAMES = ('fashion_mnist', 'fashion-mnist', 'fmnist')
TIMM_PREFIXES = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')
TRAIN_FOLDERS = ('train', 'training')
VAL_FOLDERS = ('val', 'validation', 'valid', 'test')
_GRAY_MODES = ('1', 'L', 'I', 'I;16', 'F')


class DataError(ValueError):
    """Bad dataset input: a missing path, an empty class folder, inconsistent class sets."""


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
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


# ----------------------------------------------------------------------------------------------
# dataset resolution


def dataset_kind(dataset: str) -> str:
    """'fmnist', 'timm' or 'folder' for a ``--dataset`` value."""
    if dataset.lower() in FMNIST_NAMES:
        return 'fmnist'
    if dataset.lower().startswith(TIMM_PREFIXES):
        return 'timm'
    return 'folder'


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


def _stratified_order(targets: Sequence[int], seed: int) -> List[int]:
    """Indices shuffled per class and interleaved, so any prefix is class-balanced."""
    rng = random.Random(seed)
    by_class: Dict[int, List[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    for idx in by_class.values():
        rng.shuffle(idx)
    order: List[int] = []
    queues = [by_class[c] for c in sorted(by_class)]
    depth = max((len(q) for q in queues), default=0)
    for k in range(depth):
        order.extend(q[k] for q in queues if k < len(q))
    return order


def subset(ds: Dataset, n: int | None, seed: int, name: str = 'subset') -> Dataset:
    """The first ``n`` of a seeded, class-stratified order (plain seeded shuffle without targets)."""
    if n is None:
        return ds
    if n <= 0:
        raise DataError(f'--{name} must be a positive number of images, got {n}')
    if n >= len(ds):
        if n > len(ds):
            _logger.info('%s=%d is larger than the dataset (%d images); using all of it', name, n, len(ds))
        return ds
    targets = _targets(ds)
    if targets is not None:
        order = _stratified_order(targets, seed)
    else:
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return _Subset(ds, sorted(order[:n]))


def image_folder_classes(root: Path) -> List[str]:
    """Class folder names under ``root``, each checked to hold at least one image (recursively)."""
    if not root.is_dir():
        raise DataError(f'{root} is not a folder')
    exts = get_img_extensions(as_set=True)
    classes = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')), key=natural_key)
    if not classes:
        raise DataError(
            f'{root} holds no class folders; an ImageFolder dataset is <root>/<class_name>/<image files> '
            f'(optionally under train/ and val/)')
    for c in classes:
        walk = os.walk(root / c, followlinks=True)
        has_image = any(os.path.splitext(f)[1].lower() in exts for _, _, files in walk for f in files)
        if not has_image:
            raise DataError(
                f'class folder {root / c} has no images (looked for {sorted(exts)}); '
                'remove the folder or add images to it')
    return classes


def _find_sub(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _image_mode(modes: Sequence[str]) -> str:
    """'L' when every image is single-channel, else 'RGB' (the gray ones are converted)."""
    gray = sum(m in _GRAY_MODES for m in modes)
    if gray == len(modes):
        return 'L'
    if gray:
        _logger.info('%d of %d images are grayscale and %d in colour: all are read as RGB', gray, len(modes),
                     len(modes) - gray)
    return 'RGB'


def _folder_data(
        root: Path, *, val_fraction: float | None, seed: int, class_names: Sequence[str] | None,
        split: str | None = None,
) -> DataBundle:
    if not root.exists():
        raise DataError(
            f'dataset path {str(root)!r} does not exist. --dataset takes an ImageFolder root '
            f'(<root>/train/<class>/..., <root>/val/<class>/...), a timm dataset name '
            f'({", ".join(p + "..." for p in TIMM_PREFIXES)}), or one of {list(FMNIST_NAMES)}')
    train_root = _find_sub(root, TRAIN_FOLDERS)
    val_root = _find_sub(root, VAL_FOLDERS)
    if split is not None:  # validation CLI: one split only
        names = TRAIN_FOLDERS if split in TRAIN_FOLDERS else (split, *VAL_FOLDERS)
        split_root = _find_sub(root, names) or (root if train_root is None and val_root is None else None)
        if split_root is None:
            raise DataError(f'{root} has no {split!r} folder (looked for {list(names)})')
        train_root, val_root, val_fraction = None, split_root, None
    elif train_root is None:
        if val_root is not None:
            raise DataError(f'{root} has {val_root.name}/ but no train/ folder (looked for {list(TRAIN_FOLDERS)})')
        train_root = root

    ref_root = train_root or val_root
    classes = image_folder_classes(ref_root)
    if val_root is not None and train_root is not None:
        val_classes = image_folder_classes(val_root)
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise DataError(f'{val_root} has classes that {train_root} lacks: {extra}')
        if val_fraction is not None:
            raise DataError(f'--val-fraction {val_fraction} holds out part of the training images, but {root} has '
                            f'a {val_root.name}/ folder, which is the validation split; drop --val-fraction, or '
                            f'move {val_root.name}/ away to hold out from {train_root.name}/ instead')
        absent = [c for c in classes if c not in val_classes]
        if absent:
            _logger.warning('%s has no folder for the classes %s: validation measures only the other %d classes',
                            val_root, absent, len(classes) - len(absent))
    if class_names is not None:  # the model's label order (validation of a trained model)
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DataError(
                f'{ref_root} has classes the model does not know: {unknown}; model classes: {list(class_names)}')
        label_names = list(class_names)
    else:
        label_names = classes
    class_map = {c: i for i, c in enumerate(label_names)}

    def find(folder: Path) -> List[Tuple[str, int]]:  # nested images under their class folder's label
        try:
            return class_folder_samples(folder, class_map)
        except FolderLayoutError as e:
            raise DataError(str(e)) from None

    found = {folder: find(folder) for folder in (train_root, val_root) if folder is not None}
    # every header, not a sample of them: one colour image among gray ones makes the whole set RGB
    mode = _image_mode([m for folder, samples in found.items()
                        for m in scan_images([p for p, _ in samples], str(folder))])
    in_chans = 1 if mode == 'L' else 3

    def make(folder: Path, mode: str) -> Dataset:
        return ImageFiles(folder, found[folder], mode)

    info: Dict[str, Any] = dict(kind='folder', root=str(root), image_mode=mode)

    if train_root is None:
        val_ds = make(val_root, mode)
        return DataBundle(None, val_ds, label_names, in_chans, f'ImageFolder {val_root}', info=info)

    train_ds = make(train_root, mode)
    if val_root is not None:
        val_ds = make(val_root, mode)
        desc = f'ImageFolder {train_root} (train) + {val_root} (val)'
    else:
        frac = 0.1 if val_fraction is None else val_fraction
        if not 0.0 < frac < 1.0:
            raise DataError(f'--val-fraction must be in (0, 1), got {frac!r}')
        targets = _targets(train_ds)
        by_class: Dict[int, List[int]] = {}
        for i, t in enumerate(targets):
            by_class.setdefault(t, []).append(i)
        rng = random.Random(seed)
        val_idx: List[int] = []
        for c in sorted(by_class):
            idx = by_class[c]
            rng.shuffle(idx)
            k = min(len(idx) - 1, max(1, round(frac * len(idx)))) if len(idx) > 1 else 0
            val_idx.extend(idx[:k])
        val_set = set(val_idx)
        train_idx = [i for i in range(len(train_ds)) if i not in val_set]
        if not val_idx:
            raise DataError(f'{train_root}: too few images to hold out a validation split')
        val_ds = _Subset(make(train_root, mode), sorted(val_idx))
        train_ds = _Subset(train_ds, train_idx)
        _logger.info('No val/ folder in %s: holding out %.0f%% of each class for validation (seed %d, %d images)',
                     root, 100 * frac, seed, len(val_idx))
        desc = f'ImageFolder {train_root} with a {frac:g} stratified validation hold-out'
        info['val_fraction'] = frac
    return DataBundle(train_ds, val_ds, label_names, in_chans, desc, info=info)


def _fmnist_data(data_dir: str | None, split: str | None) -> DataBundle:
    folder = fmnist.find_fashion_mnist(data_dir)
    if folder is None:
        try:
            fmnist.load_fashion_mnist('test', root=data_dir)
        except fmnist.FashionMNISTNotFound as e:
            raise DataError(f'{e} Or use --dataset torch/fashion_mnist --download when online.') from e
    info = dict(kind='fmnist', root=str(folder))
    val = TensorImageDataset(*fmnist.load_fashion_mnist('test', root=folder))
    if split is not None:
        if split in TRAIN_FOLDERS:
            val = TensorImageDataset(*fmnist.load_fashion_mnist('train', root=folder))
        return DataBundle(None, val, list(fmnist.CLASSES), 1, f'Fashion-MNIST ({folder}), {split} split', info=info)
    train = TensorImageDataset(*fmnist.load_fashion_mnist('train', root=folder))
    return DataBundle(train, val, list(fmnist.CLASSES), 1, f'Fashion-MNIST ({folder}), train + test', info=info)


def _timm_data(name: str, data_dir: str | None, download: bool, split: str | None) -> DataBundle:
    root = data_dir or os.path.join(os.path.expanduser('~'), '.cache', 'timm_dropres', 'datasets')

    def make(s: str, mode: str = 'RGB') -> Dataset:
        kwargs: Dict[str, Any] = dict(root=root, split=s, download=download)
        if not name.lower().startswith('torch/'):
            kwargs['input_img_mode'] = mode
        try:
            return create_dataset(name, **kwargs)
        except (RuntimeError, AssertionError, FileNotFoundError, ValueError) as e:
            hint = '' if download else ' Add --download to fetch it (needs internet).'
            raise DataError(f'could not load dataset {name!r} ({s} split) from {root}: {e}.{hint}') from e

    val = make(split or 'validation')
    if isinstance(val, torch.utils.data.IterableDataset):
        raise DataError(f'{name!r} is an iterable dataset; only map-style datasets (torch/, hfds/, folders) '
                        'are supported because exact resume and exact multi-process evaluation need random access')
    label_names = _label_names(val)
    sample, _ = val[0]
    in_chans = 1 if isinstance(sample, Image.Image) and sample.mode in _GRAY_MODES else 3
    mode = 'L' if in_chans == 1 else 'RGB'
    if in_chans == 1 and not name.lower().startswith('torch/'):
        val = make(split or 'validation', mode)
    info = dict(kind='timm', name=name, root=root)
    if split is not None:
        return DataBundle(None, val, label_names, in_chans, f'{name} ({split} split)', info=info)
    train = make('train', mode)
    return DataBundle(train, val, label_names, in_chans, f'{name} (train + validation)', info=info)


def _label_names(ds: Dataset) -> List[str]:
    classes = getattr(ds, 'classes', None)
    if classes:
        return [str(c) for c in classes]
    reader = getattr(ds, 'reader', None)
    c2i = getattr(reader, 'class_to_idx', None) if reader is not None else None
    if c2i:
        return [str(c) for c, _ in sorted(c2i.items(), key=lambda kv: kv[1])]
    targets = _targets(ds)
    if targets:
        return [str(i) for i in range(max(targets) + 1)]
    raise DataError(f'cannot infer the classes of {type(ds).__name__}; it exposes neither classes nor targets')


def resolve_data(
        dataset: str,
        *,
        data_dir: str | None = None,
        download: bool = False,
        val_fraction: float | None = None,
        train_subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
        split: str | None = None,
        class_names: Sequence[str] | None = None,
) -> DataBundle:
    """Resolve ``dataset`` into a :class:`DataBundle` (see the module docstring for accepted values).

    ``split`` selects a single evaluation split (validation CLI); ``class_names`` forces the label
    order (a trained model's), failing when the data has classes the model does not know.
    """
    if not dataset:
        raise DataError('no dataset given: pass --dataset (an ImageFolder path, a timm name like torch/cifar10, '
                        f'or one of {list(FMNIST_NAMES)})')
    kind = dataset_kind(dataset)
    if kind == 'fmnist':
        bundle = _fmnist_data(data_dir, split)
    elif kind == 'timm':
        bundle = _timm_data(dataset, data_dir, download, split)
    else:
        bundle = _folder_data(Path(dataset).expanduser(), val_fraction=val_fraction, seed=seed,
                              class_names=class_names, split=split)
    if kind != 'folder' and val_fraction is not None and split is None:
        bundle = _carve_validation(bundle, val_fraction, seed)
    if bundle.train is not None:
        bundle.train = subset(bundle.train, train_subset, seed, 'train-subset')
    bundle.val = subset(bundle.val, val_subset, seed + 1, 'val-subset')
    if class_names is not None and kind != 'folder':  # after subsetting, so the same images are picked
        bundle = _remap(bundle, class_names)
    if len(bundle.val) == 0:
        raise DataError(f'{bundle.description}: the validation split is empty')
    if bundle.train is not None and len(bundle.train) == 0:
        raise DataError(f'{bundle.description}: the training split is empty')
    return bundle


def _carve_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """Validate on a class-balanced ``fraction`` of the training split; the dataset's own validation (test)
    split is then left out of training and model selection entirely."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f'--val-fraction must be in (0, 1), got {fraction}')
    targets = _targets(bundle.train)
    if targets is None:
        raise DataError(f'{bundle.description}: --val-fraction needs a training split whose targets are known')
    order = _stratified_order(targets, seed)
    n_val = max(1, round(fraction * len(order)))
    val, train = _Subset(bundle.train, order[:n_val]), _Subset(bundle.train, sorted(order[n_val:]))
    desc = f'{bundle.description.split(" (")[0]} (train split: {len(train)} train + {n_val} held-out validation)'
    return dataclasses.replace(bundle, train=train, val=val, description=desc,
                               info=dict(bundle.info, val_fraction=fraction))


def _remap(bundle: DataBundle, class_names: Sequence[str]) -> DataBundle:
    if list(class_names) == bundle.label_names:
        return bundle
    unknown = sorted(set(bundle.label_names) - set(class_names))
    if unknown:
        raise DataError(f'the data has classes the model does not know: {unknown}; model classes: {list(class_names)}')
    table = [list(class_names).index(c) for c in bundle.label_names]
    bundle.val = _Remapped(bundle.val, table)
    if bundle.train is not None:
        bundle.train = _Remapped(bundle.train, table)
    bundle.label_names = list(class_names)
    return bundle


def _sample_keys(ds: Dataset) -> List[str] | None:
    """One string per sample that changes when the image file or its label does (None when unknown)."""
    if isinstance(ds, ImageFiles):
        return [f'{ds.filename(i)}\t{t}' for i, (_, t) in enumerate(ds.samples)]
    if isinstance(ds, _Subset):
        base = _sample_keys(ds.base)
        if base is not None:
            return [base[i] for i in ds.indices]
    targets = _targets(ds)
    return None if targets is None else [str(t) for t in targets]


def _digest(ds: Dataset | None) -> str | None:
    keys = _sample_keys(ds) if ds is not None else None
    return None if keys is None else hashlib.sha256('\n'.join(keys).encode()).hexdigest()[:16]


def data_signature(bundle: DataBundle) -> Dict[str, Any]:
    """What identifies the data a run trains on, for resume to compare: classes, sizes, and a digest of the
    samples (file paths relative to the dataset folder, so the folder may move, and labels).

    Args:
        bundle: the resolved data.

    Returns:
        A JSON-able dict (stored in each checkpoint's ``trainer_state.json``).
    """
    return dict(label_names=list(bundle.label_names), in_chans=bundle.in_chans,
                train_size=len(bundle.train) if bundle.train is not None else 0, val_size=len(bundle.val),
                train_files=_digest(bundle.train), val_files=_digest(bundle.val))


# ----------------------------------------------------------------------------------------------
# transforms and loaders


def channel_stats(model: torch.nn.Module, in_chans: int) -> Dict[str, Tuple[float, ...]]:
    """The model's normalisation ``mean``/``std`` for ``in_chans``-channel data, or ``ValueError``.

    RGB statistics for one-channel data become their mean (one log line, not timm's warning on every call);
    a single value is repeated; any other length mismatch (a ``config.json`` with 2 values for 3 channels)
    is refused, where timm would silently average it.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    pc = getattr(model, 'pretrained_cfg', None) or {}
    out: Dict[str, Tuple[float, ...]] = {}
    for key, default in (('mean', IMAGENET_DEFAULT_MEAN), ('std', IMAGENET_DEFAULT_STD)):
        value = pc.get(key) or default
        value = tuple(float(v) for v in ((value,) if isinstance(value, (int, float)) else value))
        if len(value) == 1:
            value = value * in_chans
        elif len(value) != in_chans:
            if not (len(value) == 3 and in_chans == 1):
                raise ValueError(f'the model\'s pretrained_cfg {key} has {len(value)} values, but the data has '
                                 f'{in_chans} channel(s): one value per channel is needed')
            value = (float(np.mean(value)),)
        out[key] = value
    return out


def resolve_transforms(
        model: torch.nn.Module,
        in_chans: int,
        *,
        img_size: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        auto_augment: str | None = None,
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        re_prob: float = 0.0,
        scale: Sequence[float] | None = None,
        ratio: Sequence[float] | None = None,
        pad_crop: int = 0,
) -> Tuple[Callable, Callable, Dict[str, Any]]:
    """timm train/eval transforms from the model's data config, adapted to ``in_chans`` and ``img_size``.

    ``pad_crop > 0`` replaces timm's RandomResizedCrop with the CIFAR recipe of He et al. (2016): resize to
    ``img_size``, zero-pad by ``pad_crop`` pixels, take a random ``img_size`` crop, flip with ``hflip``.
    timm's ``create_transform`` has no such mode, so it is composed here from torchvision transforms.
    """
    cfg = resolve_model_data_config(model, args=channel_stats(model, in_chans))
    if img_size:
        cfg['input_size'] = (in_chans, img_size, img_size)
    else:
        cfg['input_size'] = (in_chans, *cfg['input_size'][1:])
    if crop_pct is not None:
        cfg['crop_pct'] = crop_pct
    if interpolation:
        cfg['interpolation'] = interpolation
    if len(cfg['mean']) != in_chans:  # grayscale data: one channel, the mean of the RGB statistics
        cfg['mean'] = tuple([float(np.mean(cfg['mean']))] * in_chans)
        cfg['std'] = tuple([float(np.mean(cfg['std']))] * in_chans)
    common = dict(input_size=cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'])
    train_tf = create_transform(
        **common, is_training=True, auto_augment=auto_augment or None, hflip=hflip, color_jitter=color_jitter,
        re_prob=re_prob, scale=tuple(scale) if scale else None, ratio=tuple(ratio) if ratio else None)
    if pad_crop > 0:
        size = cfg['input_size'][1:]
        train_tf = T.Compose([
            T.Resize(size, interpolation=str_to_interp_mode(cfg['interpolation'])),
            T.RandomCrop(size, padding=pad_crop), T.RandomHorizontalFlip(hflip), T.ToTensor(),
            T.Normalize(cfg['mean'], cfg['std'])])
    eval_tf = create_transform(**common, is_training=False, crop_pct=cfg['crop_pct'],
                               crop_mode=cfg.get('crop_mode'))
    return train_tf, eval_tf, cfg


def create_mixup(
        mixup: float, cutmix: float, label_smoothing: float, num_classes: int,
        mixup_prob: float = 1.0, switch_prob: float = 0.5,
) -> Mixup | None:
    """timm's batch-wise Mixup/CutMix (which also applies label smoothing), or None when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=switch_prob,
                 label_smoothing=label_smoothing, num_classes=num_classes)


def _loader_kwargs(num_workers: int, pin_memory: bool) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(num_workers=num_workers, pin_memory=pin_memory)
    if num_workers > 0:
        kw['prefetch_factor'] = 4
    return kw


def train_loader(
        ds: EpochSeededDataset, batch_size: int, *, seed: int, num_workers: int, drop_last: bool,
        pin_memory: bool = False,
) -> Tuple[DataLoader, EpochSeededSampler]:
    """A loader whose order and augmentations are pure functions of (seed, epoch, position).

    Its own ``generator`` keeps the worker base-seed draw off the global RNG, so creating an iterator
    mid-run (resume) does not shift dropout's random stream.
    """
    sampler = EpochSeededSampler(len(ds), seed=seed)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                        **_loader_kwargs(num_workers, pin_memory))
    return loader, sampler


def eval_loader(ds: Dataset, batch_size: int, *, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False,
                      generator=torch.Generator().manual_seed(0), **_loader_kwargs(num_workers, pin_memory))

