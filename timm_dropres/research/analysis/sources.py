"""Input sources for the module tests: Gaussian batches and real images (Fashion-MNIST or generated)."""
from __future__ import annotations

from typing import List, Sequence  # noqa: UP035

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------

def gaussian_batches(
        n_batches: int, batch_size: int, shape: Sequence[int], *, mean: float = 0.0, std: float = 1.0, seed: int = 0,
) -> List[torch.Tensor]:
    """Draw i.i.d. Gaussian batches ``N(mean, std**2)``, reproducible from ``seed``, as module-test input.

    Args:
        n_batches: number of batches.
        batch_size: samples per batch.
        shape: the shape of one sample, e.g. ``(C, H, W)``.
        mean: mean of every element.
        std: standard deviation of every element.
        seed: seed of a private generator (the global RNG is untouched).

    Returns:
        ``n_batches`` float tensors of shape ``(batch_size, *shape)``.

    Example:
        >>> [tuple(b.shape) for b in gaussian_batches(2, 4, (3, 8, 8))]
        [(4, 3, 8, 8), (4, 3, 8, 8)]
    """
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch_size, *shape), generator=g) * std + mean for _ in range(n_batches)]


def image_batches(
        source: str, n_batches: int, batch_size: int, input_size: Sequence[int], *,
        mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), seed: int = 0,
) -> List[torch.Tensor]:
    """Make input batches for the module tests: real Fashion-MNIST images or standard Gaussian noise.

    ``'fmnist'`` takes random images of the Fashion-MNIST test split (Debian's ``dataset-fashion-mnist``,
    or ``$FASHION_MNIST_DIR``), scales them to [0, 1], resizes them bilinearly to ``input_size``, repeats
    the gray channel over ``C`` channels and normalises them with ``mean``/``std``.

    Args:
        source: ``'fmnist'`` or ``'gaussian'``.
        n_batches: number of batches (with ``'fmnist'``, at most 10,000 images in all are available, so
            fewer or smaller batches may come back).
        batch_size: images per batch.
        input_size: ``(C, H, W)``.
        mean: normalisation mean, one value per channel or a single value for all; ``'fmnist'`` only.
        std: normalisation std, one value per channel or a single value for all; ``'fmnist'`` only.
        seed: seed of the image draw, or of the Gaussian generator.

    Returns:
        Float tensors ``[batch_size, C, H, W]``. ``'gaussian'`` gives ``N(0, 1)`` and ignores ``mean``/``std``.

    Raises:
        ValueError: if ``source`` is not ``'fmnist'`` or ``'gaussian'``.
        FileNotFoundError: if ``source`` is ``'fmnist'`` and the Fashion-MNIST files are not installed.

    Example:
        >>> batches = image_batches('fmnist', 2, 16, (3, 224, 224), mean=(0.485, 0.456, 0.406),
        ...                         std=(0.229, 0.224, 0.225))  # doctest: +SKIP
    """
    chans, height, width = (int(s) for s in input_size)
    if source == 'gaussian':
        return gaussian_batches(n_batches, batch_size, (chans, height, width), seed=seed)
    if source != 'fmnist':
        raise ValueError(f"data source must be one of ['fmnist', 'gaussian'], got {source!r}")
    from ...training.fmnist import find_fashion_mnist, load_fashion_mnist
    if find_fashion_mnist() is None:
        raise FileNotFoundError(
            'Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or use --data gaussian')
    images, _ = load_fashion_mnist('test')
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:n_batches * batch_size]
    x = images[idx].float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(height, width), mode='bilinear', align_corners=False).repeat(1, chans, 1, 1)
    m = torch.tensor(list(mean) * (chans if len(mean) == 1 else 1)).view(1, chans, 1, 1)
    s = torch.tensor(list(std) * (chans if len(std) == 1 else 1)).view(1, chans, 1, 1)
    x = (x - m) / s
    return list(x.split(batch_size))


