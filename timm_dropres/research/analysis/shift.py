"""The variance-shift engine: per-BN input variance against the running statistics, BN calibration, and the
shift of a ``*_dropres`` model at each residual dropout position.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple  # noqa: UP035

import torch
import torch.nn as nn

from ...models.layers import check_rate

# ----------------------------------------------------------------------------------------------------------
# variance shift per BN layer
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BNShift:
    """Variance shift of one BN layer (see the module docstring for the exact reduction).

    Attributes:
        name: the BN's qualified module name.
        metric: mean over channels of ``max(real_c / running_c, running_c / real_c)``; 1.0 = no shift.
        real_var: channel mean of the eval-mode variance of the BN's input.
        running_var: channel mean of the BN's running variance.
        worst_channel: the largest per-channel ratio.
    """

    name: str
    metric: float
    real_var: float
    running_var: float
    worst_channel: float

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain, JSON-serialisable dict."""
        return asdict(self)


def _first(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get('pixel_values'), torch.Tensor):
        return batch['pixel_values']
    raise TypeError(f'a batch must be a tensor or a (input, target) tuple/list, got {type(batch).__name__}')


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device('cpu')


def _bn_layers(model: nn.Module) -> List[Tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BN layers that keep running statistics (the only ones variance shift applies to)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_var is not None]


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Set train/eval for the whole tree and restore every module's own flag afterwards."""
    saved = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, flag in saved.items():
            m.training = flag


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: Iterable[Any]) -> int:
    """Reset every BN's running statistics and re-estimate them in train mode (dropout active).

    This gives a freshly built model the statistics training would give it. ``momentum=None`` makes the
    estimate an exact cumulative average over the batches, independent of the number of batches, which a
    momentum of 0.1 would not be. The BN buffers are modified in place; each module's train/eval flag
    and each BN's momentum are restored afterwards.

    Args:
        model: the network; BN layers without running statistics are left alone.
        batches: tensors, ``(input, target, ...)`` tuples/lists, or dicts with ``'pixel_values'``; moved to
            the model's device.

    Returns:
        The number of batches used.

    Raises:
        ValueError: if the model has no BN layer with running statistics, or ``batches`` is empty (the
            statistics have then already been reset).
        TypeError: if a batch is none of the accepted forms.
    """
    bns = _bn_layers(model)
    if not bns:
        raise ValueError(f'{type(model).__name__} has no BatchNorm layer with running statistics to calibrate')
    momenta = {m: m.momentum for _, m in bns}
    for _, m in bns:
        m.reset_running_stats()
        m.momentum = None
    device = _device(model)
    count = 0
    try:
        with _mode(model, True):
            for batch in batches:
                model(_first(batch).to(device))
                count += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
    if count == 0:
        raise ValueError('calibrate_batches is empty: no batch to estimate BN statistics from')
    return count


class _Moments:
    """Per-channel running sums for the variance of a BN's input, pooled over all batches (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        s1, s2 = flat.sum(1), (flat * flat).sum(1)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += flat.shape[1]

    def var(self) -> torch.Tensor:
        assert self.s1 is not None and self.s2 is not None
        mean = self.s1 / self.n
        return (self.s2 / self.n - mean * mean).clamp_min(0.0)


def run_with_input_hooks(
        model: nn.Module, modules: Dict[str, nn.Module], batches: Iterable[Any],
        on_input: Callable[[str, torch.Tensor], None], *, training: bool = False,
        on_output: Callable[[torch.Tensor], None] | None = None,
) -> int:
    """Run ``model`` over ``batches`` and call ``on_input(name, x)`` with the input of each observed module.

    The building block of the module tests: forward pre-hooks on ``modules`` report every input they
    see. The hooks are removed and every module's train/eval flag restored afterwards, also on error.
    Gradients are not disabled here: wrap the call in ``torch.no_grad()`` when they are not needed.

    Args:
        model: the network to run (batches are moved to its device).
        modules: the modules to observe, by name.
        batches: tensors, ``(tensor, target, ...)`` tuples/lists, or dicts with ``'pixel_values'``.
        on_input: called with the module's name and its first positional input, at every forward.
        training: run in train mode (dropout active, BN batch statistics) instead of eval mode.
        on_output: called with the model's output of every batch.

    Returns:
        The number of batches run.

    Raises:
        TypeError: if a batch is none of the accepted forms.
    """
    handles = [m.register_forward_pre_hook(partial(_call_with_name, on_input, name)) for name, m in modules.items()]
    device = _device(model)
    count = 0
    try:
        with _mode(model, training):
            for batch in batches:
                out = model(_first(batch).to(device))
                if on_output is not None:
                    on_output(out)
                count += 1
    finally:
        for h in handles:
            h.remove()
    return count


def _call_with_name(fn: Callable[[str, torch.Tensor], None], name: str, _module: nn.Module, args: Tuple[Any, ...]
                    ) -> None:
    fn(name, args[0])


@torch.no_grad()
def variance_shift(
        model: nn.Module,
        batches: Iterable[Any],
        *,
        calibrate_batches: Iterable[Any] | None = None,
        eps: float = 1e-12,
) -> List[BNShift]:
    """Measure the eval-mode variance shift of every BN layer, in forward order (see the module docstring).

    The model runs in eval mode on ``batches``; for each BN, the per-channel variance of its input pooled
    over all batches is compared with its running variance.

    Args:
        model: the network. With ``calibrate_batches`` its BN buffers are re-estimated in place first.
        batches: measurement batches: tensors, ``(input, target, ...)`` tuples/lists, or dicts with
            ``'pixel_values'``; iterated once.
        calibrate_batches: if given, reset and re-estimate the BN statistics in train mode on these batches
            first (see ``calibrate_bn``); use different batches from ``batches``.
        eps: added to both variances before taking their ratio, so zero-variance channels do not divide by 0.

    Returns:
        One ``BNShift`` per BN layer that tracks running statistics and was reached by the forward pass, in
        the order the forward pass reached them.

    Raises:
        ValueError: if the model has no BN layer with running statistics, or ``batches`` (or
            ``calibrate_batches``) is empty.
        TypeError: if a batch is none of the accepted forms.

    Example:
        >>> import timm
        >>> from timm_dropres.research.analysis.sources import gaussian_batches
        >>> records = variance_shift(timm.create_model('resnet18'), gaussian_batches(2, 8, (3, 64, 64)))
        >>> len(records), records[0].name
        (20, 'bn1')
    """
    if calibrate_batches is not None:
        calibrate_bn(model, calibrate_batches)
    bns = _bn_layers(model)
    if not bns:
        raise ValueError(f'{type(model).__name__} has no BatchNorm layer with running statistics')
    moments: Dict[str, _Moments] = {n: _Moments() for n, _ in bns}
    order: List[str] = []

    def record(name: str, x: torch.Tensor) -> None:
        if moments[name].n == 0:
            order.append(name)
        moments[name].add(x)

    if run_with_input_hooks(model, dict(bns), batches, record) == 0:
        raise ValueError('batches is empty: nothing to measure')
    by_name = dict(bns)
    records = []
    for name in order:
        real = moments[name].var()
        running = by_name[name].running_var.detach().double().cpu()
        real = real.cpu()
        ratio = (real + eps) / (running + eps)
        per_channel = torch.maximum(ratio, 1.0 / ratio)
        records.append(BNShift(
            name=name, metric=float(per_channel.mean()), real_var=float(real.mean()),
            running_var=float(running.mean()), worst_channel=float(per_channel.max())))
    return records


def shift_mean(records: Sequence[BNShift]) -> float:
    """Average the variance shift over BN layers (the summary Li et al. and PAPER.md quote).

    Args:
        records: per-layer results of ``variance_shift``.

    Returns:
        The mean of ``metric`` over the layers.

    Raises:
        ValueError: if ``records`` is empty.

    Example:
        >>> recs = [BNShift('bn1', 1.0, 1.0, 1.0, 1.0), BNShift('bn2', 1.5, 1.5, 1.0, 2.0)]
        >>> shift_mean(recs), shift_max(recs)
        (1.25, 1.5)
    """
    if not records:
        raise ValueError('no variance-shift records')
    return sum(r.metric for r in records) / len(records)


def shift_max(records: Sequence[BNShift]) -> float:
    """Return the worst layer's variance shift.

    Args:
        records: per-layer results of ``variance_shift``.

    Returns:
        The largest ``metric`` over the layers.

    Raises:
        ValueError: if ``records`` is empty.
    """
    if not records:
        raise ValueError('no variance-shift records')
    return max(r.metric for r in records)


def dropout_train_var(var: float, mean: float, p: float) -> float:
    """Return the train-mode variance of inverted dropout's output, the quantity behind variance shift.

    With keep probability ``q = 1 - p``, dropout on an input with mean ``mean`` and variance ``var`` gives
    ``(var + mean**2) / q - mean**2`` in train mode (Li et al.); the eval-mode variance is ``var``.

    Args:
        var: variance of the input.
        mean: mean of the input.
        p: drop probability, in [0, 1).

    Returns:
        The train-mode variance.

    Raises:
        ValueError: if ``p`` is not in [0, 1).

    Example:
        >>> dropout_train_var(1.0, 0.0, 0.5), dropout_train_var(1.0, 1.0, 0.5)
        (2.0, 3.0)
    """
    q = 1.0 - check_rate('p', p)
    return (var + mean * mean) / q - mean * mean


# ----------------------------------------------------------------------------------------------------------
# variance shift across dropout positions of a *_dropres model
# ----------------------------------------------------------------------------------------------------------

def shift_by_position(
        model_name: str,
        positions: Sequence[str],
        batches: Sequence[Any],
        calibrate_batches: Sequence[Any],
        *,
        res_drop_rate: float = 0.3,
        seed: int = 0,
        **model_kwargs: Any,
) -> Dict[str, List[BNShift]]:
    """Measure the variance shift per BN of a fresh ``*_dropres`` model for each residual dropout position.

    For each position the model is built anew, its BN statistics calibrated in train mode on
    ``calibrate_batches``, then measured in eval mode on ``batches`` (see ``variance_shift``). The same seed
    gives every position the same weights, so only the placement differs. Models are built with
    ``zero_init_last=False`` unless told otherwise: timm zero-initialises the last BN (or conv) of every
    branch, so a fresh branch outputs zeros and ``after_last_bn`` dropout would have nothing to drop.

    Args:
        model_name: a ``*_dropres`` model name for ``timm.create_model``.
        positions: ``res_drop_pos`` values to compare; ``'none'`` builds the model without residual dropout.
        batches: measurement batches (reused for every position).
        calibrate_batches: calibration batches (reused for every position).
        res_drop_rate: residual dropout rate, in [0, 1).
        seed: seed of the weights (and, plus one, of the dropout masks).
        **model_kwargs: further ``timm.create_model`` arguments; ``drop_rate``, ``res_drop_rate`` and
            ``res_drop_pos`` are always overridden (head dropout off).

    Returns:
        ``{position: per-BN records}`` in the order of ``positions``.

    Raises:
        ValueError: if a position is unknown, a rate is invalid, or a batch list is empty.

    Example:
        >>> from timm_dropres.research.analysis.sources import gaussian_batches
        >>> batches = [gaussian_batches(2, 8, (3, 64, 64), seed=s) for s in (0, 1)]
        >>> res = shift_by_position('resnet18_dropres', ['none', 'after_last_bn'], *batches)
        >>> list(res), shift_mean(res['after_last_bn']) > shift_mean(res['none'])
        (['none', 'after_last_bn'], True)
    """
    import timm

    from ...models.layers import RES_DROP_POSITIONS
    valid = ('none', *RES_DROP_POSITIONS)
    results = {}
    for pos in positions:
        if pos not in valid:
            raise ValueError(f'position must be one of {list(valid)}, got {pos!r}')
        kwargs = dict(dict(zero_init_last=False), **model_kwargs)
        kwargs.update(drop_rate=0.0, res_drop_rate=0.0 if pos == 'none' else res_drop_rate,
                      res_drop_pos='auto' if pos == 'none' else pos)
        torch.manual_seed(seed)
        model = timm.create_model(model_name, **kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            results[pos] = variance_shift(model, batches, calibrate_batches=calibrate_batches)
    return results


