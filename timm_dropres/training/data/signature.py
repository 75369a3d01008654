"""The data signature a checkpoint records, so that resume can tell whether the data changed."""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List

from torch.utils.data import Dataset

from .dataset import DataBundle, ImageFiles, _Subset, _targets


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


