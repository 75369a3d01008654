"""A study's data: the splits every run shares, and the in-memory fast path.

Training and validation images come from the dataset's training split (a class-balanced ``val_fraction``
hold-out); the test split is separate and read once per run, after training. Everything is resolved with the
trainer's own :func:`timm_dropres.training.data.resolve_data`, so a study accepts exactly what
``dropres-finetune`` accepts, and every split and subset is drawn with the study's ``data.seed``: identical for
every run.

The fast path (``in_memory: true``) decodes and preprocesses every image once, with the trainer's eval transform
at the model's resolution, and hands the trainer tensors (``DataBundle(preprocessed=True)``): no PIL decode,
resize or normalisation per step. Augmentation then runs on tensors (:class:`TensorAugment`), seeded per sample
by the trainer's ``EpochSeededDataset`` from ``(seed, epoch, index)``, so every configuration of a seed sees the
same augmented images.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..training.data import (
    DataBundle,
    DataError,
    TensorImageDataset,
    TransformedDataset,
    data_signature,
    dataset_kind,
    resolve_data,
    subset,
)
from .spec import DataSpec

__all__ = ['SplitData', 'TensorAugment', 'resolve_splits', 'tensor_bundle', 'materialise', 'test_split_name']


@dataclass
class SplitData:
    """The untransformed train, validation and test splits of a study (PIL images or uint8 tensors)."""

    train: Dataset
    val: Dataset
    test: Dataset
    label_names: List[str]
    in_chans: int
    description: str
    signature: Dict[str, Any] = field(default_factory=dict)

    def bundle(self) -> DataBundle:
        """Train + validation as the trainer takes them (transforms are applied by the trainer)."""
        return DataBundle(self.train, self.val, list(self.label_names), self.in_chans, self.description)


class _Relabelled(Dataset):
    """The samples of some classes only, their targets renumbered (``targets_list`` keeps them stratifiable)."""

    def __init__(self, base: Dataset, indices: Sequence[int], targets: Sequence[int]) -> None:
        self.base, self.indices, self.targets_list = base, list(indices), list(targets)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, _ = self.base[self.indices[index]]
        return img, self.targets_list[index]


def _targets(ds: Dataset) -> List[int]:
    """The targets of ``ds``, from its target attributes when it has them, else by reading every sample."""
    for attr in ('targets_list', 'targets'):
        t = getattr(ds, attr, None)
        if t is not None:
            return [int(x) for x in t]
    return [int(ds[i][1]) for i in range(len(ds))]


def _class_indices(classes: Sequence[Any], label_names: Sequence[str]) -> List[int]:
    """``data.classes`` (names or indices) as class indices, in the order given."""
    out = []
    for c in classes:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(label_names):
            out.append(c)
        elif str(c) in label_names:
            out.append(list(label_names).index(str(c)))
        else:
            raise DataError(f'data.classes: {c!r} is neither a class name nor an index of {list(label_names)}')
    return out


def _keep_classes(ds: Dataset, table: Dict[int, int]) -> _Relabelled:
    targets = _targets(ds)
    keep = [i for i, t in enumerate(targets) if t in table]
    return _Relabelled(ds, keep, [table[targets[i]] for i in keep])


def test_split_name(spec: DataSpec) -> str:
    """The split read as the test set: ``spec.test_split``, else ``validation`` for timm datasets, else ``test``."""
    if spec.test_split:
        return spec.test_split
    return 'validation' if dataset_kind(spec.dataset) == 'timm' else 'test'


def resolve_splits(spec: DataSpec) -> SplitData:
    """Resolve the study's train, validation and test splits (see the module docstring).

    An ImageFolder needs ``<root>/train/<class>/...`` and a test folder (``test/``, else ``val/``): the
    validation images are held out of ``train/``, so the test folder is never seen before the end of a run.

    Raises:
        DataError: a missing split, an unknown class, an empty subset.
    """
    kind = dataset_kind(spec.dataset)
    test_split = test_split_name(spec)
    if kind == 'folder':
        root = Path(spec.dataset).expanduser()
        if not (root / 'train').is_dir():
            raise DataError(f'{root}: a study needs {root}/train/<class>/... (training and validation images) and '
                            f'{root}/test/ or {root}/val/ (the test images, read once per run)')
        trainval = resolve_data(str(root / 'train'), val_fraction=spec.val_fraction, seed=spec.seed)
        test = resolve_data(str(root), split=test_split, class_names=trainval.label_names)
    else:
        trainval = resolve_data(spec.dataset, data_dir=spec.data_dir, download=spec.download,
                                val_fraction=spec.val_fraction, seed=spec.seed)
        test = resolve_data(spec.dataset, data_dir=spec.data_dir, download=spec.download, split=test_split)
        if test.label_names != trainval.label_names:
            raise DataError(f'{spec.dataset}: the {test_split} split has classes {test.label_names}, the training '
                            f'split {trainval.label_names}')
    train, val, test_ds = trainval.train, trainval.val, test.val
    names = list(trainval.label_names)
    if spec.classes is not None:
        idx = _class_indices(spec.classes, names)
        table = {c: i for i, c in enumerate(idx)}
        train, val, test_ds = (_keep_classes(d, table) for d in (train, val, test_ds))
        names = [names[c] for c in idx]
    train = subset(train, spec.train_subset, spec.seed, 'train_subset')
    val = subset(val, spec.val_subset, spec.seed + 1, 'val_subset')
    test_ds = subset(test_ds, spec.test_subset, spec.seed + 2, 'test_subset')
    for what, ds in (('training', train), ('validation', val), ('test', test_ds)):
        if len(ds) == 0:
            raise DataError(f'{spec.dataset}: the {what} split is empty')
    desc = (f'{trainval.description.split(" (")[0]}: {len(train)} train / {len(val)} validation (held out of the '
            f'training split) / {len(test_ds)} test ({test_split} split)')
    sig = data_signature(DataBundle(train, val, names, trainval.in_chans))
    sig['test'] = data_signature(DataBundle(None, test_ds, names, trainval.in_chans))['val_files']
    sig['test_size'] = len(test_ds)
    return SplitData(train, val, test_ds, names, trainval.in_chans, desc, sig)


def materialise(ds: Dataset, transform: Callable | None, batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``ds`` through ``transform``, stacked: ``(float images [N, C, H, W], int64 targets [N])``."""
    loader = DataLoader(TransformedDataset(ds, transform), batch_size=batch_size, shuffle=False, num_workers=0)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs).contiguous(), torch.cat(ys).long()


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TensorAugment:
    """Random translation (zero-padding of ``pad`` pixels with black, then a random crop) and horizontal flip of
    one CHW tensor, drawn from torch's global RNG (which the trainer seeds per sample).

    Args:
        pad: maximum translation in pixels (0: none).
        hflip: flip probability.
        fill: per-channel value of a black pixel after normalisation (``-mean / std``).
    """

    def __init__(self, pad: int, hflip: float, fill: Sequence[float]) -> None:
        self.pad, self.hflip = int(pad), float(hflip)
        self.fill = torch.tensor(list(fill), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            c, h, w = x.shape
            p = self.pad
            padded = self.fill.to(x.dtype).expand(c, h + 2 * p, w + 2 * p).clone()
            padded[:, p:p + h, p:p + w] = x
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, dy:dy + h, dx:dx + w]
        if self.hflip and float(torch.rand(())) < self.hflip:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f'TensorAugment(pad={self.pad}, hflip={self.hflip})'


def tensor_bundle(splits: SplitData, eval_transform: Callable, data_cfg: Dict[str, Any], spec: DataSpec
                  ) -> Tuple[DataBundle, TensorImageDataset, TensorImageDataset, Dict[str, Any]]:
    """The fast path: every split preprocessed once with ``eval_transform`` into tensors.

    Args:
        splits: the resolved splits.
        eval_transform: the trainer's eval transform for the model (resize, crop, normalise).
        data_cfg: the model's resolved data config (its ``mean``/``std`` give the padding value).
        spec: the data spec (its ``augment``).

    Returns:
        ``(bundle, test, train_eval, digests)``: the trainer's preprocessed bundle with ``TensorAugment`` as its
        training transform, the test tensors, the (unaugmented) training tensors for the train NLL, and a digest
        of each split's tensors.
    """
    (xtr, ytr), (xva, yva), (xte, yte) = (materialise(d, eval_transform) for d in (splits.train, splits.val,
                                                                                   splits.test))
    fill = [-m / s for m, s in zip(data_cfg['mean'], data_cfg['std'], strict=True)]
    aug = spec.augment
    train_tf = TensorAugment(int(aug.get('pad', 0)), float(aug.get('hflip', 0.0)), fill) if aug else None
    train = TensorImageDataset(xtr, ytr)
    bundle = DataBundle(train, TensorImageDataset(xva, yva), list(splits.label_names), splits.in_chans,
                        splits.description + ', in memory', preprocessed=True, train_transform=train_tf)
    digests = dict(train=_digest(xtr, ytr), val=_digest(xva, yva), test=_digest(xte, yte),
                   input_size=list(xtr.shape[1:]))
    return bundle, TensorImageDataset(xte, yte), train, digests

