"""Resolve what the user named (a folder, a timm dataset name, Fashion-MNIST) into train/val datasets."""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from PIL import Image
from timm.data import create_dataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from .. import fmnist
from .dataset import DataBundle, DataError, ImageFiles, TensorImageDataset, _Remapped, _Subset, _targets, scan_images
from .folder_scan import FolderLayoutError, class_folder_samples

_logger = logging.getLogger(__name__)

FMNIST_NAMES = ('fashion_mnist', 'fashion-mnist', 'fmnist')
TIMM_PREFIXES = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')
TRAIN_FOLDERS = ('train', 'training')
VAL_FOLDERS = ('val', 'validation', 'valid', 'test')
_GRAY_MODES = ('1', 'L', 'I', 'I;16', 'F')
# ----------------------------------------------------------------------------------------------
# dataset resolution


def dataset_kind(dataset: str) -> str:
    """Which kind of dataset a ``dataset`` value names.

    Args:
        dataset: the value (a folder, a timm dataset name or ``fashion_mnist``).

    Returns:
        ``'fmnist'``, ``'timm'`` or ``'folder'``.
    """
    if dataset.lower() in FMNIST_NAMES:
        return 'fmnist'
    if dataset.lower().startswith(TIMM_PREFIXES):
        return 'timm'
    return 'folder'

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
    """The first ``n`` of a seeded, class-stratified order (plain seeded shuffle without targets).

    Args:
        ds: the dataset.
        n: how many samples to keep (None: all of them).
        seed: the order's seed.
        name: the option that set ``n``, for the log line when ``n`` exceeds the dataset.

    Returns:
        ``ds`` itself when ``n`` is None or not smaller, else a view of ``n`` of its samples.
    """
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
    """Class folder names under ``root``, each checked to hold at least one image (recursively).

    Args:
        root: an ImageFolder root (one folder per class).

    Returns:
        The class names, sorted as timm sorts them (natural order).

    Raises:
        DataError: ``root`` is not a folder or has no class folders, or a class folder holds no images.
    """
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
            'dataset path {path!r} does not exist. {0} takes an ImageFolder root (<root>/train/<class>/..., '
            '<root>/val/<class>/...), a timm dataset name ({prefixes}), or one of {fmnist}', 'dataset',
            path=str(root), prefixes=', '.join(p + '...' for p in TIMM_PREFIXES), fmnist=list(FMNIST_NAMES))
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
            raise DataError('{0} {fraction} holds out part of the training images, but {root} has a {val}/ folder, '
                            'which is the validation split; drop {0}, or move {val}/ away to hold out from {train}/ '
                            'instead', 'val_fraction', fraction=val_fraction, root=root, val=val_root.name,
                            train=train_root.name)
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
            raise DataError('{0} must be in (0, 1), got {value!r}', 'val_fraction', value=frac)
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
            raise DataError('{e} Or use {0} torch/fashion_mnist {1} when online.', 'dataset', 'download', e=e) from e
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
            hint = '' if download else ' Add {0} to fetch it (needs internet).'
            raise DataError('could not load dataset {name!r} ({s} split) from {root}: {e}.' + hint,
                            *(() if download else ('download',)), name=name, s=s, root=root, e=e) from e

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

    Args:
        dataset: a folder, a timm dataset name or ``fashion_mnist``.
        data_dir: the root folder of timm dataset names (their download target).
        download: let torchvision download ``torch/*`` datasets.
        val_fraction: the hold-out fraction of a folder without a validation split (None: 0.1).
        train_subset: keep a class-balanced subset of this many training images.
        val_subset: keep a class-balanced subset of this many validation images.
        seed: the seed of the hold-out and the subsets.
        split: ``'val'`` or ``'train'``: resolve only that split, as the evaluation set.
        class_names: the label order to use (a trained model's).

    Returns:
        The datasets, the class names, the channel count and a description.

    Raises:
        DataError: a missing path, an empty class folder, inconsistent class sets, classes the model does
            not know, or a dataset that needs a download.
    """
    if not dataset:
        raise DataError('no dataset given: pass {0} (an ImageFolder path, a timm name like torch/cifar10, or one of '
                        '{fmnist})', 'dataset', fmnist=list(FMNIST_NAMES))
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
        raise DataError('{0} must be in (0, 1), got {value}', 'val_fraction', value=fraction)
    targets = _targets(bundle.train)
    if targets is None:
        raise DataError('{desc}: {0} needs a training split whose targets are known', 'val_fraction',
                        desc=bundle.description)
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


