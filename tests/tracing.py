"""Execution-order tracing for placement tests: which leaf module or tensor op ran, in order.

Forward hooks see modules; a TorchFunctionMode sees what runs between them (the residual ``+=``,
functional dropout). Ops that run inside a leaf module are attributed to that module only.

The forward runs without autograd: in a train-mode forward with autograd the post-activation blocks fuse
their dropout with the residual addition into one call (``layers.fuse_with_add``), which would hide the
module and the ``+=`` this trace checks the order of; tests/models/test_layers.py checks that the fused
blocks compute what the separate ops compute.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

_OPS = {
    torch.Tensor.__iadd__: 'add', torch.Tensor.__add__: 'add', torch.add: 'add', torch.Tensor.add_: 'add',
    torch.nn.functional.dropout: 'F.dropout',
    torch.nn.functional.adaptive_avg_pool2d: 'pool', torch.flatten: 'flatten',
}


class _OpLog(TorchFunctionMode):
    def __init__(self, events: List[str], depth: List[int]) -> None:
        super().__init__()
        self.events, self.depth = events, depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth[0] == 0 and func in _OPS:
            self.events.append(f'op:{_OPS[func]}')
        return func(*args, **(kwargs or {}))


def trace(model: nn.Module, x: torch.Tensor) -> List[str]:
    """Run ``model(x)`` and return the events: ``'<module name>'`` for leaf modules, ``'op:<name>'`` for ops."""
    events: List[str] = []
    depth = [0]
    handles = []
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    for name, mod in leaves:
        def pre(_m, _a, name=name):
            if depth[0] == 0:
                events.append(name)
            depth[0] += 1

        def post(_m, _a, _o):
            depth[0] -= 1
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        with torch.no_grad(), _OpLog(events, depth):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return events
