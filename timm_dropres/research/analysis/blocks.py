"""The residual-block module test: one pre- or post-activation basic block, dropout at each candidate position."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence, Tuple  # noqa: UP035

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.layers import ResidualDropout, check_rate
from .shift import BNShift, _Moments, dropout_train_var, run_with_input_hooks, variance_shift
from .sources import gaussian_batches

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


