"""Datasets and loaders for fine-tuning: resolve what the user named into train/val datasets.

Three kinds of ``dataset`` are understood:

* a folder path (ImageFolder): ``root/train/<class>/*`` and ``root/val/<class>/*`` (``validation``,
  ``valid``, ``test`` also accepted for val), or class folders directly under ``root`` / ``root/train``
  with a seeded, stratified hold-out fraction for validation;
* a name timm's ``create_dataset`` understands (``torch/cifar10``, ``torch/fashion_mnist``, ``hfds/...``);
* ``fashion_mnist`` (alias ``fmnist``): Debian's ``dataset-fashion-mnist`` via :mod:`timm_dropres.training.fmnist`,
  found without any flag.

Class count, label names and input channels are inferred from the data. Transforms and Mixup come from
timm. The one hand-written piece is :class:`EpochSeededDataset`: it seeds each sample's augmentation
from ``(seed, epoch, index)`` so that a resumed run sees exactly the augmentations an uninterrupted
run would have seen, whatever the worker count (timm/torch have no such wrapper).

Modules, split as ``timm.data`` is: ``dataset`` (the dataset classes), ``dataset_factory`` (``resolve_data``),
``transforms_factory`` (``resolve_transforms``, ``create_mixup``), ``loader`` (``train_loader``, ``eval_loader``)
and ``signature`` (``data_signature``, for resume); this package re-exports their public names.
"""
from __future__ import annotations

from .dataset import (
    DataBundle,
    DataError,
    EpochSeededDataset,
    EpochSeededSampler,
    ImageFiles,
    TensorImageDataset,
    TransformedDataset,
    scan_images,
)
from .dataset_factory import (
    FMNIST_NAMES,
    TIMM_PREFIXES,
    TRAIN_FOLDERS,
    VAL_FOLDERS,
    dataset_kind,
    image_folder_classes,
    resolve_data,
    subset,
)
from .loader import eval_loader, iterate, train_loader
from .signature import data_signature
from .transforms_factory import channel_stats, create_mixup, resolve_transforms

__all__ = [
    'DataBundle', 'DataError', 'ImageFiles', 'EpochSeededDataset', 'TransformedDataset', 'EpochSeededSampler',
    'TensorImageDataset', 'FMNIST_NAMES', 'TIMM_PREFIXES', 'VAL_FOLDERS', 'TRAIN_FOLDERS', 'resolve_data', 'subset',
    'resolve_transforms', 'create_mixup', 'train_loader', 'eval_loader', 'iterate', 'dataset_kind',
    'image_folder_classes', 'scan_images', 'data_signature', 'channel_stats',
]
