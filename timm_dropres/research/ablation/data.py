"""The ablation's data: Fashion-MNIST in memory, class and per-class subsets, and the augmentation."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .spec import DataSpec

# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------

@dataclass
class AblationData:
    """The ablation's data, in memory and normalized once.

    Attributes:
        train_x: normalized float training images ``[N, 1, 28, 28]``.
        train_y: int64 training labels ``[N]``.
        test_x: normalized float test images ``[M, 1, 28, 28]``.
        test_y: int64 test labels ``[M]``.
        pad_value: the normalized value of a black pixel, used to pad for the random-crop augmentation.
        num_classes: number of classes (labels are ``0..num_classes-1``).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    pad_value: float = 0.0
    num_classes: int = 10


def load_fmnist_data(spec: DataSpec, root: Optional[str | os.PathLike] = None) -> AblationData:
    """Load Fashion-MNIST as in-memory tensors for the ablation, subset as ``spec`` says.

    Normalization uses the mean and std of the full training split (all classes), so a subset does not
    change the input scale. Subsets are applied in this order: ``classes``, then ``train_per_class``,
    then ``train_subset``/``test_subset``, all drawn from one generator seeded with ``spec.data_seed``.

    Args:
        spec: which classes and how many images.
        root: folder holding the four idx files; None searches ``$FASHION_MNIST_DIR`` and Debian's path.

    Returns:
        The normalized tensors and labels.

    Raises:
        FileNotFoundError: if the Fashion-MNIST idx files are not found (``FashionMNISTNotFound``).
        ValueError: if a subset size is out of range, a class has fewer than ``train_per_class`` images, or
            an idx file is malformed.

    Example:
        >>> data = load_fmnist_data(DataSpec(train_per_class=100, classes=(0, 1)))  # doctest: +SKIP
        >>> data.train_x.shape, data.num_classes  # doctest: +SKIP
        (torch.Size([200, 1, 28, 28]), 2)
    """
    from ...training.fmnist import load_fashion_mnist

    tr_x, tr_y = load_fashion_mnist('train', root)
    te_x, te_y = load_fashion_mnist('test', root)
    mean, std = tr_x.float().mean().item() / 255.0, tr_x.float().std().item() / 255.0
    g = torch.Generator().manual_seed(spec.data_seed)

    def subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if n is None:
            return x, y
        if not 0 < n <= len(x):
            raise ValueError(f'{split}_subset must be in [1, {len(x)}] or null, got {n}')
        idx = torch.randperm(len(x), generator=g)[:n]
        return x[idx], y[idx]

    num_classes = 10
    if spec.classes is not None:
        tr_x, tr_y = select_classes(tr_x, tr_y, spec.classes)
        te_x, te_y = select_classes(te_x, te_y, spec.classes)
        num_classes = len(spec.classes)
    if spec.train_per_class is not None:
        idx = per_class_subset(tr_y, spec.train_per_class, g)
        tr_x, tr_y = tr_x[idx], tr_y[idx]
    tr_x, tr_y = subset(tr_x, tr_y, spec.train_subset, 'train')
    te_x, te_y = subset(te_x, te_y, spec.test_subset, 'test')

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - mean) / std).unsqueeze(1).contiguous()

    return AblationData(norm(tr_x), tr_y, norm(te_x), te_y, pad_value=-mean / std, num_classes=num_classes)


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples of ``classes`` only, relabelled ``0..len(classes)-1`` in the order given.

    Args:
        x: samples, indexed along the first dimension.
        y: integer labels ``[N]``.
        classes: the original labels to keep; their position becomes the new label.

    Returns:
        ``(x, y)`` restricted to those classes, in the original sample order, with the new labels.

    Example:
        >>> import torch
        >>> x, y = select_classes(torch.arange(5), torch.tensor([3, 1, 3, 0, 1]), [3, 1])
        >>> x.tolist(), y.tolist()
        ([0, 1, 2, 4], [0, 1, 0, 1])
    """
    table = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    table[torch.tensor(list(classes))] = torch.arange(len(classes))
    new = table[y]
    keep = new >= 0
    return x[keep], new[keep]


def per_class_subset(y: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Draw a class-balanced subset: ``per_class`` random samples of every class present in ``y``.

    Args:
        y: integer labels ``[N]``.
        per_class: samples to draw from each class.
        generator: the RNG of the draw (the same generator state gives the same subset).

    Returns:
        int64 indices into ``y``, grouped by class in ascending label order (``per_class`` per class).

    Raises:
        ValueError: if a class has fewer than ``per_class`` samples.

    Example:
        >>> import torch
        >>> idx = per_class_subset(torch.tensor([0, 1, 0, 1, 0]), 2, torch.Generator().manual_seed(0))
        >>> torch.tensor([0, 1, 0, 1, 0])[idx].tolist()
        [0, 0, 1, 1]
    """
    out = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f'class {c} has {len(idx)} samples, fewer than per_class={per_class}')
        out.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(out)


def _augment(x: torch.Tensor, pad_value: float, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (``pad`` pixels of translation) and horizontal flip, per sample, on a batch tensor."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=pad_value)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None] + dy[:, None])[:, :, None]
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


