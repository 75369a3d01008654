"""The paper's module tests as reusable functions: variance shift per BN, one residual block, the head.

Variance shift (Li et al., CVPR 2019; PAPER.md): a BN whose input is dropped in training keeps
running statistics from the inflated training variance, then meets a smaller variance at test time.

``variance_shift(model, batches, *, calibrate_batches=None) -> list[BNShift]``
    One record per BatchNorm layer that tracks running statistics, in forward order. The model runs
    in **eval** mode on ``batches``; a pre-hook on every BN accumulates the per-channel variance of
    its input over all batches (the "real" variance, pooled over batch and spatial positions, float64).
    For channel ``c``: ``r_c = max(real_c / running_c, running_c / real_c)``. The record holds

    * ``name``: the BN's qualified module name;
    * ``metric``: the **mean over channels** of ``r_c`` (1.0 = no shift). The mean of the per-channel
      ratio, not the ratio of mean variances, so a few shifted channels are not hidden by many large ones;
    * ``real_var`` / ``running_var``: channel means of the two variances (for reading the table);
    * ``worst_channel``: ``max_c r_c``.

    With ``calibrate_batches``, the BN running statistics are first **reset and re-estimated** in train
    mode (dropout active, as during training) as an exact cumulative average over those batches
    (``momentum=None``), then the model is measured. This modifies the model's BN buffers in place; it is
    how a freshly built model gets the statistics that training would give it. Training mode and BN
    momenta are restored afterwards.

``shift_mean(records)``, ``shift_max(records)``: the mean and the max of ``metric`` over layers.

Batches are tensors or ``(input, target, ...)`` tuples/lists; only the first element is used.
Sampling noise biases the metric slightly above 1 (``max(r, 1/r) >= 1``): expect ~1.005 without dropout
on the default sizes, more for late layers with few spatial positions.

``residual_block_test(pre_act, ...)``: one pre- or post-activation basic block on Gaussian input, one
dropout at each candidate position (``BLOCK_POSITIONS``); train- vs eval-mode output statistics, the
shift at the first BN that consumes the dropped activations and at the next block's BN, and the analytic
prediction wherever the path from the dropout to that BN is linear.

``head_variance_test(features, ...)``: variance over dropout masks of pooled features and logits with
dropout before vs after global average pooling, against the exact expectation and ``1 / (H*W)``.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple  # noqa: UP035

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.layers import ResidualDropout, check_rate

__all__ = [
    'BNShift', 'variance_shift', 'calibrate_bn', 'shift_mean', 'shift_max', 'format_shift_table',
    'BLOCK_POSITIONS', 'BlockResult', 'ModuleTestBlock', 'residual_block_test', 'format_block_table',
    'HeadResult', 'head_variance_test', 'head_test_on_model', 'iid_head_sweep', 'shift_by_position',
    'gaussian_batches', 'image_batches', 'dropout_train_var', 'plot_shift', 'plot_block', 'plot_head',
    'GUIDELINE_POSITION', 'run_with_input_hooks',
]


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


def format_shift_table(records: Sequence[BNShift], title: str = '') -> str:
    """Format variance-shift records as a per-layer text table, with the mean/max summary at the bottom.

    Args:
        records: per-layer results of ``variance_shift``.
        title: optional first line.

    Returns:
        The table: one row per layer (shift, worst channel, real and running variance), then mean and max.

    Raises:
        ValueError: if ``records`` is empty.
    """
    width = max([len(r.name) for r in records] + [5])
    lines = [title] if title else []
    lines.append(f'{"BN layer":<{width}}  {"shift":>7}  {"worst ch":>8}  {"real var":>10}  {"running var":>11}')
    lines += [f'{r.name:<{width}}  {r.metric:7.3f}  {r.worst_channel:8.3f}  {r.real_var:10.4g}  {r.running_var:11.4g}'
              for r in records]
    lines.append(f'{"mean":<{width}}  {shift_mean(records):7.3f}')
    lines.append(f'{"max":<{width}}  {shift_max(records):7.3f}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# residual-block module test
# ----------------------------------------------------------------------------------------------------------

#: Candidate dropout positions in the two block forms, in forward order. ``none`` = no dropout (reference).
BLOCK_POSITIONS: Dict[str, Tuple[str, ...]] = {
    # BN1-ReLU-conv1-BN2-ReLU-conv2 (+x). before_conv2 is the paper's guideline (Wide ResNet's position).
    'pre': ('none', 'before_bn1', 'before_conv1', 'before_bn2', 'before_conv2', 'after_conv2', 'after_add'),
    # conv1-BN1-ReLU-conv2-BN2 (+x) -ReLU. after_bn2 = core 'after_last_bn', before_conv2 = 'before_last_conv'.
    'post': ('none', 'before_conv1', 'before_bn1', 'before_conv2', 'before_bn2', 'after_bn2', 'after_add'),
}
#: The position the library uses for each form (the guideline; ``after_bn2`` is the post-act default).
GUIDELINE_POSITION = {'pre': 'before_conv2', 'post': 'after_bn2'}

# position -> (first BN that consumes the dropped activations, the single conv on the way or None).
# Only linear paths (convs, the residual addition) are listed: there the injected noise variance has a
# closed form. post/after_bn2 reaches the next BN through a ReLU, so it has no entry.
_LINEAR_PATH: Dict[str, Dict[str, Tuple[str, str | None]]] = {
    'pre': {'before_bn1': ('bn1', None), 'before_conv1': ('bn2', 'conv1'), 'before_bn2': ('bn2', None),
            'before_conv2': ('next_bn', 'conv2'), 'after_conv2': ('next_bn', None), 'after_add': ('next_bn', None)},
    'post': {'before_conv1': ('bn1', 'conv1'), 'before_bn1': ('bn1', None), 'before_conv2': ('bn2', 'conv2'),
             'before_bn2': ('bn2', None), 'after_add': ('next_bn', 'next_conv')},
}
# positions with a linear path to the block output: the conv on the way, if any
_OUT_PATH: Dict[str, Dict[str, str | None]] = {
    'pre': {'before_conv2': 'conv2', 'after_conv2': None, 'after_add': None},
    'post': {'after_add': None},
}
# the first BN downstream of each position (for the table, also where no prediction exists)
_CONSUMER = {
    'pre': {'none': 'next_bn', 'before_bn1': 'bn1', 'before_conv1': 'bn2', 'before_bn2': 'bn2',
            'before_conv2': 'next_bn', 'after_conv2': 'next_bn', 'after_add': 'next_bn'},
    'post': {'none': 'next_bn', 'before_conv1': 'bn1', 'before_bn1': 'bn1', 'before_conv2': 'bn2',
             'before_bn2': 'bn2', 'after_bn2': 'next_bn', 'after_add': 'next_bn'},
}


class ModuleTestBlock(nn.Module):
    """One basic residual block with a single ``ResidualDropout`` at a named position, for the module test.

    The block is followed by the start of the next block (``next_bn``; post-activation:
    ``next_conv -> next_bn``) whose BN is "the following BN" of the module test. It is written out
    explicitly, unlike the library's blocks, because the test needs positions the library deliberately
    does not offer. Convs are He-initialised (``fan_out``); ``forward`` returns ``next_bn``'s output and
    keeps the block's own output in ``block_out``.

    Args:
        channels: channels of every conv and BN (the block keeps the shape of its input).
        pre_act: pre-activation form (BN-ReLU-conv) instead of post-activation (conv-BN-ReLU).
        position: where the dropout sits, one of ``BLOCK_POSITIONS['pre' or 'post']`` (``'none'``: no dropout).
        p: drop probability, in [0, 1) (ignored for ``'none'``).

    Raises:
        ValueError: if ``position`` is not valid for the form, or ``p`` is not in [0, 1).
    """

    def __init__(self, channels: int, *, pre_act: bool, position: str, p: float) -> None:
        super().__init__()
        form = 'pre' if pre_act else 'post'
        if position not in BLOCK_POSITIONS[form]:
            raise ValueError(f'position for a {form}-activation block must be one of {list(BLOCK_POSITIONS[form])}, '
                             f'got {position!r}')
        self.pre_act, self.position = pre_act, position
        c = channels
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.next_conv = None if pre_act else nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.next_bn = nn.BatchNorm2d(c)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        self.drop = ResidualDropout(p if position != 'none' else 0.0, where=position)
        self.block_out: torch.Tensor | None = None   # the block output of the last forward, for the statistics

    def _d(self, here: str, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) if here == self.position else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block and the start of the next one; the block output is kept in ``block_out``."""
        d = self._d
        if self.pre_act:
            h = F.relu(self.bn1(d('before_bn1', x)))
            h = self.conv1(d('before_conv1', h))
            h = F.relu(self.bn2(d('before_bn2', h)))
            h = d('after_conv2', self.conv2(d('before_conv2', h)))
            out = d('after_add', x + h)
            self.block_out = out
            return self.next_bn(out)
        h = self.conv1(d('before_conv1', x))
        h = F.relu(self.bn1(d('before_bn1', h)))
        h = self.conv2(d('before_conv2', h))
        h = d('after_bn2', self.bn2(d('before_bn2', h)))
        out = d('after_add', F.relu(x + h))
        self.block_out = out
        assert self.next_conv is not None
        return self.next_bn(self.next_conv(out))


@dataclass(frozen=True)
class BlockResult:
    """Module-test result for one block form and dropout position.

    ``*_pred`` fields are the analytic predictions, None where the path from the dropout is not linear.

    Attributes:
        form: ``'pre'`` or ``'post'`` activation.
        position: the dropout position (``'none'``: the reference without dropout).
        p: the drop probability (0.0 for ``'none'``).
        guideline: whether ``position`` is the guideline position of this form (``GUIDELINE_POSITION``).
        out_mean_train: channel mean of the block output's mean in train mode.
        out_mean_eval: the same in eval mode.
        out_var_train: channel mean of the block output's variance in train mode.
        out_var_eval: the same in eval mode.
        out_var_pred: train-mode block-output variance predicted from eval-mode moments.
        consumer: the first BN downstream of the dropout (``'bn1'``, ``'bn2'`` or ``'next_bn'``).
        consumer_shift: measured variance shift at ``consumer``.
        consumer_shift_pred: predicted variance shift at ``consumer``.
        next_bn_shift: measured variance shift at the following block's BN.
        closed_form: Li et al.'s ``((s2 + mu^2) / q - mu^2) / s2``, where the BN sees the Gaussian input
            directly.
        shifts: every BN's ``BNShift``.
    """

    form: str                       # 'pre' | 'post'
    position: str
    p: float
    guideline: bool
    out_mean_train: float
    out_mean_eval: float
    out_var_train: float
    out_var_eval: float
    out_var_pred: float | None   # train-mode block-output variance predicted from eval-mode moments
    consumer: str                   # first BN downstream of the dropout
    consumer_shift: float
    consumer_shift_pred: float | None
    next_bn_shift: float            # variance shift at the following block's BN
    closed_form: float | None    # Li et al.'s ((s2 + mu^2) / q - mu^2) / s2, where the BN sees the input directly
    shifts: Tuple[BNShift, ...]

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain, JSON-serialisable dict (``shifts`` as a list of dicts)."""
        d = asdict(self)
        d['shifts'] = [s.as_dict() for s in self.shifts]
        return d


def _channel_stats(xs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    m = _Moments()
    for x in xs:
        m.add(x)
    assert m.s1 is not None
    return m.s1 / m.n, m.var()


@torch.no_grad()
def _noise_var(block: ModuleTestBlock, inputs: Sequence[torch.Tensor], conv: nn.Conv2d | None, p: float
               ) -> torch.Tensor:
    """Per-channel variance that dropout adds where its output, after ``conv`` (or directly), is consumed.

    Inverted dropout keeps ``a`` as ``a * m / q``, ``m ~ Bernoulli(q)``: zero-mean noise of variance
    ``a**2 (1 - q) / q``, independent across elements and of the signal. A conv sums it with weights
    ``w``, so the noise variance at each output is ``conv(a**2, w**2) (1 - q) / q``; an addition with the
    shortcut passes it unchanged. Averaged over batch and positions: the gap between the BN's train and
    eval variance.
    """
    q = 1.0 - p
    total, n = None, 0
    for a in inputs:
        a2 = a.double() ** 2
        if conv is not None:
            a2 = F.conv2d(a2, conv.weight.double() ** 2, stride=conv.stride, padding=conv.padding)
        s = a2.sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        n += a2.shape[0] * a2.shape[2] * a2.shape[3]
    assert total is not None
    return total / n * (1.0 - q) / q


@torch.no_grad()
def residual_block_test(
        pre_act: bool,
        *,
        positions: Sequence[str] | None = None,
        p: float = 0.3,
        channels: int = 16,
        size: int = 16,
        batch_size: int = 64,
        n_batches: int = 8,
        mean: float = 0.0,
        std: float = 1.0,
        seed: int = 0,
) -> List[BlockResult]:
    """Run the paper's residual-block module test on Gaussian input ``N(mean, std**2)``.

    For each dropout position: build the block (same weights for every position), calibrate its BN
    statistics in train mode on ``n_batches`` batches, then on ``n_batches`` fresh batches measure the
    eval-mode variance shift of every BN and the block output's train- vs eval-mode statistics. Where the
    dropout reaches its first BN through a linear path, the shift is also predicted analytically (see
    ``_noise_var``), and where that BN sees the Gaussian input itself, by Li et al.'s closed form.
    Fully seeded: the same arguments give the same results.

    Args:
        pre_act: test the pre-activation block form instead of the post-activation one.
        positions: dropout positions to test (default: every one of ``BLOCK_POSITIONS`` for the form).
        p: drop probability, in [0, 1).
        channels: channels of the block.
        size: height and width of the input.
        batch_size: samples per batch.
        n_batches: batches for calibration, and again for measurement.
        mean: mean of the Gaussian input.
        std: standard deviation of the Gaussian input.
        seed: seed of weights, inputs and dropout masks.

    Returns:
        One ``BlockResult`` per position, in the order of ``positions``.

    Raises:
        ValueError: if ``p`` is not in [0, 1) or a position is not valid for the form.

    Example:
        >>> rs = residual_block_test(True, positions=['none', 'before_conv2'], size=8, batch_size=16, n_batches=2)
        >>> [(r.position, r.consumer, r.guideline) for r in rs]
        [('none', 'next_bn', False), ('before_conv2', 'next_bn', True)]
    """
    p = check_rate('p', p)
    form = 'pre' if pre_act else 'post'
    chosen = list(positions) if positions is not None else list(BLOCK_POSITIONS[form])
    shape = (channels, size, size)
    calib = gaussian_batches(n_batches, batch_size, shape, mean=mean, std=std, seed=seed + 1)
    evals = gaussian_batches(n_batches, batch_size, shape, mean=mean, std=std, seed=seed + 2)
    results = []
    for position in chosen:
        torch.manual_seed(seed)   # identical weights for every position
        block = ModuleTestBlock(channels, pre_act=pre_act, position=position, p=p)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 3)
            shifts = variance_shift(block, evals, calibrate_batches=calib)
        by_name = {s.name: s for s in shifts}

        # eval-mode: block output, the dropout's input, and the consumer BN's input (per channel)
        drop_in: List[torch.Tensor] = []
        outs_eval: List[torch.Tensor] = []
        run_with_input_hooks(block, {'drop': block.drop}, evals, lambda _n, x, s=drop_in: s.append(x.clone()),
                             on_output=lambda _o, s=outs_eval, b=block: s.append(b.block_out.clone()))
        # train-mode output statistics on a copy, so the calibrated buffers stay as they were
        trained = copy.deepcopy(block)
        outs_train: List[torch.Tensor] = []
        with torch.random.fork_rng():
            torch.manual_seed(seed + 4)
            run_with_input_hooks(trained, {}, evals, lambda _n, _x: None, training=True,
                                 on_output=lambda _o, s=outs_train, b=trained: s.append(b.block_out.clone()))
        mean_e, var_e = _channel_stats(outs_eval)
        mean_t, var_t = _channel_stats(outs_train)

        consumer = _CONSUMER[form][position]
        path = _LINEAR_PATH[form].get(position)
        consumer_pred = out_var_pred = closed = None
        if path is not None and position != 'none':
            target, conv_name = path
            conv = getattr(block, conv_name) if conv_name else None
            noise = _noise_var(block, drop_in, conv, p)
            real = _bn_input_var(block, getattr(block, target), evals)
            ratio = (real + noise) / real
            consumer_pred = float(torch.maximum(ratio, 1.0 / ratio).mean())
            if position in _OUT_PATH[form]:   # the block output is on a linear path from the dropout
                out_conv = _OUT_PATH[form][position]
                out_noise = _noise_var(block, drop_in, getattr(block, out_conv) if out_conv else None, p)
                out_var_pred = float((var_e + out_noise).mean())
            if conv is None and position in ('before_bn1',) and pre_act:
                closed = dropout_train_var(std ** 2, mean, p) / std ** 2
        results.append(BlockResult(
            form=form, position=position, p=p if position != 'none' else 0.0,
            guideline=position == GUIDELINE_POSITION[form],
            out_mean_train=float(mean_t.mean()), out_mean_eval=float(mean_e.mean()),
            out_var_train=float(var_t.mean()), out_var_eval=float(var_e.mean()), out_var_pred=out_var_pred,
            consumer=consumer, consumer_shift=by_name[consumer].metric, consumer_shift_pred=consumer_pred,
            next_bn_shift=by_name['next_bn'].metric, closed_form=closed, shifts=tuple(shifts)))
    return results


def _bn_input_var(block: nn.Module, bn: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-channel eval-mode variance of ``bn``'s input over ``batches``."""
    moments = _Moments()
    run_with_input_hooks(block, {'bn': bn}, batches, lambda _n, x: moments.add(x))
    return moments.var()


def format_block_table(results: Sequence[BlockResult]) -> str:
    """Format module-test results as a text table, with ``-`` where no analytic prediction exists.

    Args:
        results: results of ``residual_block_test``, of one or both forms.

    Returns:
        One row per result (guideline positions marked ``*``) and a legend line.
    """
    def f(v: float | None, fmt: str = '.3f') -> str:
        return '-' if v is None else format(v, fmt)

    lines = [f'{"form":<4}  {"position":<13} {"p":>4}  {"out mean tr/ev":>15}  {"out var tr/ev":>15}  '
             f'{"pred var":>8}  {"consumer BN":<11} {"shift":>6} {"pred":>6} {"closed":>6}  {"next BN":>7}']
    for r in results:
        mark = ' *' if r.guideline else ''
        lines.append(
            f'{r.form:<4}  {r.position + mark:<13} {r.p:4.2f}  {r.out_mean_train:7.3f}/{r.out_mean_eval:<7.3f}  '
            f'{r.out_var_train:7.3f}/{r.out_var_eval:<7.3f}  {f(r.out_var_pred):>8}  {r.consumer:<11} '
            f'{r.consumer_shift:6.3f} {f(r.consumer_shift_pred):>6} {f(r.closed_form):>6}  {r.next_bn_shift:7.3f}')
    lines.append('* = the guideline position (pre: the paper\'s; post: the library default after_last_bn)')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------
# head module test
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadResult:
    """Variance over dropout masks of pooled features (and logits) with dropout before vs after pooling.

    ``*_var_*`` are means over samples and units of the per-unit variance across masks. ``ratio`` is
    before / after. ``ratio_pred`` is the exact expectation given the feature maps,
    ``sum_hw a**2 / (sum_hw a)**2`` averaged as the variances are; ``ratio_iid`` is ``1 / (H * W)``, which
    it equals when every position carries the same value and approaches for independent positions with
    small spread (it is ``(1 + CV**2) / (H * W)`` in general).

    Attributes:
        p: the drop probability.
        n_masks: number of dropout masks drawn.
        hw: ``H * W`` of the feature maps.
        pooled_var_before: variance of the pooled features with dropout on the feature map, before pooling.
        pooled_var_after: variance of the pooled features with dropout after pooling.
        ratio: ``pooled_var_before / pooled_var_after``.
        ratio_pred: the exact expectation of ``ratio`` given the feature maps.
        ratio_iid: ``1 / (H * W)``.
        logit_ratio: the same ratio for the logits; None without a linear classifier.
        logit_ratio_pred: its exact expectation; None without a linear classifier.
    """

    p: float
    n_masks: int
    hw: int
    pooled_var_before: float
    pooled_var_after: float
    ratio: float
    ratio_pred: float
    ratio_iid: float
    logit_ratio: float | None
    logit_ratio_pred: float | None

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a plain, JSON-serialisable dict."""
        return asdict(self)


def _classifier_weight(fc: nn.Module | None) -> torch.Tensor | None:
    """``[K, C]`` weight of a linear classifier (``nn.Linear`` or a 1x1 conv, as in ResNetV2), else None."""
    if isinstance(fc, nn.Linear) or (isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1):
        return fc.weight.detach().double().cpu().flatten(1)
    return None


@torch.no_grad()
def head_variance_test(
        features: torch.Tensor,
        *,
        p: float = 0.3,
        n_masks: int = 200,
        fc: nn.Module | None = None,
        seed: int = 0,
) -> HeadResult:
    """Compare dropout before vs after global average pooling on ``features``, over random masks.

    Dropout on the feature map before pooling averages ``H * W`` independent masks per channel, so the
    pooled features vary far less across masks than with one mask after pooling. This measures both
    variances (float64, on CPU) over ``n_masks`` masks and compares them with the exact expectation.

    Args:
        features: final feature maps ``[N, C, H, W]``.
        p: drop probability, in (0, 1).
        n_masks: number of masks drawn (at least 2).
        fc: an ``nn.Linear`` or 1x1 conv classifier, to also measure the logit variances; other heads are
            ignored.
        seed: seed of a private mask generator.

    Returns:
        The measured and predicted variances and ratios.

    Raises:
        ValueError: if ``p`` is not in (0, 1), ``features`` is not 4-D, or ``n_masks`` is below 2.

    Example:
        >>> import torch
        >>> r = head_variance_test(torch.ones(2, 4, 4, 4), p=0.3, n_masks=50)
        >>> r.hw, round(r.ratio_pred, 4), r.ratio_iid
        (16, 0.0625, 0.0625)
    """
    p = check_rate('p', p)
    if p == 0.0:
        raise ValueError('p must be > 0 for the head test: with p = 0 both variances are zero')
    if features.dim() != 4:
        raise ValueError(f'features must be [N, C, H, W], got shape {tuple(features.shape)}')
    if n_masks < 2:
        raise ValueError(f'n_masks must be >= 2, got {n_masks}')
    f = features.detach().double().cpu()
    hw = f.shape[2] * f.shape[3]
    w = _classifier_weight(fc)
    gen = torch.Generator().manual_seed(seed)
    q = 1.0 - p
    sums: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    pooled = f.mean(dim=(2, 3))
    for _ in range(n_masks):
        mask_map = (torch.rand(f.shape, generator=gen, dtype=torch.float64) < q).double() / q
        mask_vec = (torch.rand(pooled.shape, generator=gen, dtype=torch.float64) < q).double() / q
        before = (f * mask_map).mean(dim=(2, 3))
        after = pooled * mask_vec
        outs = {'pb': before, 'pa': after}
        if w is not None:
            outs['lb'], outs['la'] = before @ w.t(), after @ w.t()
        for k, v in outs.items():
            s1, s2 = sums.get(k, (torch.zeros_like(v), torch.zeros_like(v)))
            sums[k] = (s1 + v, s2 + v * v)

    def var(k: str) -> float:
        s1, s2 = sums[k]
        m = s1 / n_masks
        return float(((s2 / n_masks - m * m) * n_masks / (n_masks - 1)).mean())

    noise = (1.0 - q) / q
    s_before = (f * f).sum(dim=(2, 3)) / hw ** 2                 # [N, C]: E-variance factor before pooling
    s_after = pooled * pooled                                    # [N, C]
    ratio_pred = float((noise * s_before).mean() / (noise * s_after).mean())
    logit_ratio = logit_pred = None
    if w is not None:
        logit_ratio = var('lb') / var('la')
        logit_pred = float((s_before @ (w * w).t()).mean() / (s_after @ (w * w).t()).mean())
    vb, va = var('pb'), var('pa')
    return HeadResult(p=p, n_masks=n_masks, hw=hw, pooled_var_before=vb, pooled_var_after=va, ratio=vb / va,
                      ratio_pred=ratio_pred, ratio_iid=1.0 / hw, logit_ratio=logit_ratio,
                      logit_ratio_pred=logit_pred)


@torch.no_grad()
def head_test_on_model(
        model: nn.Module, batches: Iterable[Any], *, p: float = 0.3, n_masks: int = 100, seed: int = 0,
) -> HeadResult:
    """Run the head test on a model's real final feature maps (``forward_features``, eval mode) and classifier.

    Args:
        model: a model with ``forward_features`` returning ``[N, C, H, W]`` maps; its ``get_classifier()``
            (if any) is used for the logit variances when it is linear.
        batches: input batches (tensors, ``(input, target, ...)`` tuples/lists, or dicts with
            ``'pixel_values'``).
        p: drop probability, in (0, 1).
        n_masks: number of masks drawn (at least 2).
        seed: seed of the mask generator.

    Returns:
        The head test on the concatenated feature maps of all batches.

    Raises:
        TypeError: if the model has no ``forward_features``, or a batch is none of the accepted forms.
        ValueError: if the features are not 4-D, ``p`` is not in (0, 1), or ``n_masks`` is below 2.
    """
    if not hasattr(model, 'forward_features'):
        raise TypeError(f'{type(model).__name__} has no forward_features(); pass feature maps to head_variance_test')
    device = _device(model)
    with _mode(model, False):
        feats = torch.cat([model.forward_features(_first(b).to(device)).float().cpu() for b in batches])
    fc = model.get_classifier() if hasattr(model, 'get_classifier') else None
    return head_variance_test(feats, p=p, n_masks=n_masks, fc=fc, seed=seed)


def iid_head_sweep(
        sizes: Sequence[int] = (1, 2, 4, 8), *, p: float = 0.3, n: int = 16, channels: int = 32, n_masks: int = 200,
        mean: float = 1.0, std: float = 0.25, seed: int = 0,
) -> List[HeadResult]:
    """Run the head test on synthetic maps with independent positions, for each map size.

    Each map is ``|N(mean, std**2)|`` per element (non-negative, like post-ReLU features), so the measured
    ratio approaches ``1 / (H * W)`` for small ``std / mean``.

    Args:
        sizes: ``H = W`` of the maps, one test each.
        p: drop probability, in (0, 1).
        n: samples per map batch.
        channels: channels of the maps.
        n_masks: masks per test (at least 2).
        mean: mean of the Gaussian before the absolute value.
        std: standard deviation of the Gaussian before the absolute value.
        seed: seed of the maps and the masks.

    Returns:
        One ``HeadResult`` per size, in the order of ``sizes``.

    Raises:
        ValueError: if ``p`` is not in (0, 1) or ``n_masks`` is below 2.

    Example:
        >>> [r.hw for r in iid_head_sweep((1, 2, 4), n_masks=20)]
        [1, 4, 16]
    """
    g = torch.Generator().manual_seed(seed)
    return [head_variance_test((torch.randn(n, channels, s, s, generator=g) * std + mean).abs(), p=p,
                               n_masks=n_masks, seed=seed) for s in sizes]


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


# ----------------------------------------------------------------------------------------------------------
# plots (matplotlib, optional dependency: the 'plot' extra)
# ----------------------------------------------------------------------------------------------------------

def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'timm-dropres[plot]'") from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_shift(results: Dict[str, List[BNShift]], path: str, title: str = '') -> str:
    """Plot the variance shift of every BN layer in forward order, one line per position, and save it.

    Args:
        results: ``{label: per-BN records}``, e.g. the output of ``shift_by_position``.
        path: image file to write (format from its extension).
        title: plot title (default: ``'variance shift per BN layer'``).

    Returns:
        ``path``.

    Raises:
        ImportError: if matplotlib is not installed (the ``plot`` extra).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for pos, recs in results.items():
        ax.plot(range(len(recs)), [r.metric for r in recs], marker='o', ms=3,
                label=f'{pos} (mean {shift_mean(recs):.3f}, max {shift_max(recs):.3f})')
    ax.axhline(1.0, color='grey', lw=0.8)
    ax.set_xlabel('BN layer (forward order)')
    ax.set_ylabel('variance shift  max(real/running, running/real)')
    ax.set_title(title or 'variance shift per BN layer')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_block(results: Sequence[BlockResult], path: str) -> str:
    """Plot the module-test results, one panel per block form, and save the figure.

    Bars: measured shift at the consuming BN and at the next block's BN per position; black x: the
    analytic prediction at the consuming BN, where one exists.

    Args:
        results: results of ``residual_block_test``.
        path: image file to write (format from its extension).

    Returns:
        ``path``.

    Raises:
        ImportError: if matplotlib is not installed (the ``plot`` extra).
    """
    plt = _pyplot()
    forms = sorted({r.form for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(forms), figsize=(6 * len(forms), 4), squeeze=False)
    for ax, form in zip(axes[0], forms, strict=True):
        rs = [r for r in results if r.form == form]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r.consumer_shift for r in rs], 0.4, label='consuming BN (measured)')
        ax.bar([x + 0.2 for x in xs], [r.next_bn_shift for r in rs], 0.4, label="next block's BN (measured)")
        pred = [(x - 0.2, r.consumer_shift_pred) for x, r in zip(xs, rs, strict=True) if r.consumer_shift_pred]
        if pred:
            ax.scatter(*zip(*pred, strict=True), color='k', marker='x', zorder=3, label='analytic')
        ax.set_xticks(list(xs), [r.position + (' *' if r.guideline else '') for r in rs], rotation=30, ha='right')
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.set_title(f'{form}-activation block, p = {max(r.p for r in rs):g} (* = guideline)')
        ax.set_ylabel('variance shift')
        ax.legend(fontsize=8, loc='upper left')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_head(sweep: Sequence[HeadResult], path: str, real: HeadResult | None = None, label: str = '') -> str:
    """Plot the head-test variance ratio (before / after pooling) against H*W on log-log axes, and save it.

    The measured ratios are drawn with the exact prediction and ``1 / (H*W)``.

    Args:
        sweep: results of ``iid_head_sweep``.
        path: image file to write (format from its extension).
        real: optional result on a real model's feature maps (``head_test_on_model``), drawn as one point.
        label: legend text for ``real``.

    Returns:
        ``path``.

    Raises:
        ImportError: if matplotlib is not installed (the ``plot`` extra).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    hw = [r.hw for r in sweep]
    ax.plot(hw, [r.ratio for r in sweep], 'o', label='measured, independent positions')
    ax.plot(hw, [r.ratio_pred for r in sweep], 'x', color='k', label='exact prediction')
    ax.plot(hw, [1.0 / h for h in hw], '--', color='grey', label='1 / (H*W)')
    if real is not None:
        ax.plot([real.hw], [real.ratio], 's', color='C3', label=f'real feature maps {label}'.strip())
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('H * W')
    ax.set_ylabel('var(dropout before pool) / var(after pool)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
