"""Train and eval ``DataLoader``s: epoch-seeded order for training, plain order for evaluation."""
from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Iterable, Iterator, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .dataset import EpochSeededDataset, EpochSeededSampler


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

    Args:
        ds: the training set, wrapped so that its augmentations are seeded per epoch.
        batch_size: images per batch.
        seed: the run's seed (order and augmentations).
        num_workers: loader worker processes.
        drop_last: drop the last incomplete batch.
        pin_memory: pin host memory (CUDA).

    Returns:
        ``(loader, sampler)``; call ``set_epoch`` on both the sampler and ``ds`` before each epoch.
    """
    sampler = EpochSeededSampler(len(ds), seed=seed)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                        **_loader_kwargs(num_workers, pin_memory))
    return loader, sampler


def eval_loader(ds: Dataset, batch_size: int, *, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A loader over ``ds`` in its own order, every sample once.

    Args:
        ds: the evaluation set (transforms applied).
        batch_size: images per batch.
        num_workers: loader worker processes.
        pin_memory: pin host memory (CUDA).

    Returns:
        The loader.
    """
    return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False,
                      generator=torch.Generator().manual_seed(0), **_loader_kwargs(num_workers, pin_memory))


_END = object()  # iterate(): an empty loader's first next()


def iterate(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``loader`` with Ctrl-C held back while it starts its worker processes.

    A loader with workers forks them when iteration starts: at ``iter()`` for a ``DataLoader``, at the first
    ``next()`` for accelerate's prepared loaders (their ``__iter__`` is a generator). Python runs its at-fork
    callbacks then (logging's lock release among them), and a ``KeyboardInterrupt`` raised inside such a
    callback is printed as "Exception ignored" and lost: the run would go on as if Ctrl-C had never been
    pressed. With SIGINT blocked in the main thread until the first batch is there, a Ctrl-C pressed then is
    delivered right after. (The workers inherit the blocked signal; the main process stops them, as it does
    anyway.)

    Args:
        loader: a ``DataLoader`` or a loader prepared by accelerate.

    Yields:
        The loader's batches.
    """
    if (not getattr(loader, 'num_workers', 0) or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, 'pthread_sigmask')):
        yield from loader
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        it = iter(loader)
        first = next(it, _END)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    if first is _END:
        return
    yield first
    yield from it
