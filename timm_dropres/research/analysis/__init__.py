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

Modules: ``shift`` (the variance-shift engine), ``sources`` (input batches), ``blocks`` and ``head`` (the two
module tests), ``tables`` and ``plots``; this package re-exports their public names.
"""
from __future__ import annotations

from .blocks import BLOCK_POSITIONS, GUIDELINE_POSITION, BlockResult, ModuleTestBlock, residual_block_test
from .head import HeadResult, head_test_on_model, head_variance_test, iid_head_sweep
from .plots import plot_block, plot_head, plot_shift
from .shift import (
    BNShift,
    calibrate_bn,
    dropout_train_var,
    run_with_input_hooks,
    shift_by_position,
    shift_max,
    shift_mean,
    variance_shift,
)
from .sources import gaussian_batches, image_batches
from .tables import format_block_table, format_shift_table

__all__ = [
    'BNShift', 'variance_shift', 'calibrate_bn', 'shift_mean', 'shift_max', 'format_shift_table', 'BLOCK_POSITIONS',
    'BlockResult', 'ModuleTestBlock', 'residual_block_test', 'format_block_table', 'HeadResult',
    'head_variance_test', 'head_test_on_model', 'iid_head_sweep', 'shift_by_position', 'gaussian_batches',
    'image_batches', 'dropout_train_var', 'plot_shift', 'plot_block', 'plot_head', 'GUIDELINE_POSITION',
    'run_with_input_hooks'
]
