"""The execution trace: module hooks and a ``TorchFunctionMode`` that record every tensor op of one forward pass."""
from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# ----------------------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Node:
    idx: int
    kind: str                   # input | dropout | bn | linear | add | pool | random | other
    name: str
    op: str
    inputs: List[int]
    in_shape: Tuple[int, ...] = ()
    out_shape: Tuple[int, ...] = ()
    p: float | None = None
    positions: int = 0          # pools: how many positions are averaged
    random: bool = False        # carries only random-mask values (no data)
    mask: bool = False          # a functional "x * random mask" dropout


_DROPOUT_FNS: Dict[Callable[..., Any], str] = {
    F.dropout: 'F.dropout', F.dropout1d: 'F.dropout1d', F.dropout2d: 'F.dropout2d', F.dropout3d: 'F.dropout3d',
    F.alpha_dropout: 'F.alpha_dropout', F.feature_alpha_dropout: 'F.feature_alpha_dropout',
    torch.dropout: 'torch.dropout', torch.feature_dropout: 'torch.feature_dropout',
    torch.alpha_dropout: 'torch.alpha_dropout', torch.native_dropout: 'torch.native_dropout',
}
_LINEAR_FNS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               F.linear, F.bilinear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
               torch.Tensor.__rmatmul__, torch.bmm, torch.Tensor.bmm, torch.mm, torch.Tensor.mm, torch.addmm,
               torch.baddbmm, torch.einsum, F.scaled_dot_product_attention}
_ADD_FNS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
            torch.Tensor.__iadd__}
_REDUCE_FNS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
               F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.max_pool1d, F.max_pool2d, F.max_pool3d, F.lp_pool1d, F.lp_pool2d,
               torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.amax, torch.Tensor.amax,
               torch.max, torch.Tensor.max, torch.logsumexp, torch.Tensor.logsumexp}
_SELECT_FNS = {torch.Tensor.__getitem__, torch.select, torch.Tensor.select}
# ops whose output is a fresh tensor that carries none of its input's values
_FACTORY_FNS = {torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
                torch.Tensor.new_tensor, torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}
_RANDOM_FNS = {torch.bernoulli, torch.Tensor.bernoulli, torch.Tensor.bernoulli_, torch.rand, torch.rand_like,
               torch.randn, torch.randn_like, torch.randint_like, torch.Tensor.uniform_, torch.Tensor.normal_,
               torch.Tensor.exponential_, torch.Tensor.geometric_, torch.randperm, torch.multinomial}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_NAME_PARTS = ('Dropout', 'DropPath', 'DropBlock', 'StochasticDepth')


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], pos: int, key: str, default: Any = None) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[pos] if len(args) > pos else default


def _tensors(obj: Any) -> List[torch.Tensor]:
    """The tensors in ``obj`` (nested lists, tuples, dicts), left to right."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif not isinstance(obj, (list, tuple)) or isinstance(obj, torch.Size):
        return []
    found: List[torch.Tensor] = []
    for o in obj:
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, (list, tuple, dict)):
            found.extend(_tensors(o))
    return found


def _multi_position(shape: Sequence[int]) -> bool:
    """A map or token sequence with more than one position: two or more non-batch dimensions above 1."""
    return len(shape) >= 3 and sum(s > 1 for s in shape[1:]) >= 2


def _pool_positions(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """How many positions a reduction collapses per channel when it is a global pool, else 0.

    ``(B, C, H, W)`` (or channels-last) to ``(B, C)`` / ``(B, C, 1, 1)``, or ``(B, N, C)`` to ``(B, C)``.
    """
    if len(in_shape) < 3 or len(out_shape) < 2 or out_shape[0] != in_shape[0]:
        return 0
    rest = [s for s in out_shape[1:] if s != 1]
    channels = (in_shape[2],) if len(in_shape) == 3 else (in_shape[1], in_shape[-1])
    if len(rest) != 1 or rest[0] not in channels:
        return 0
    n_in, n_out = math.prod(in_shape[1:]), math.prod(out_shape[1:])
    return n_in // n_out if n_out and n_in % n_out == 0 else 0


def _dropout_module_p(m: nn.Module) -> Tuple[bool, float | None]:
    """(is a dropout-like module, its drop probability).

    torch's dropout classes (and subclasses), and modules named like one (``DropPath``, ``DropBlock2d``,
    ``StochasticDepth``, ...) that hold no parameters or buffers: a module that does hold some (a norm called
    ``NormWithDropout``) is traced inside, so its own ops stay visible.
    """
    if not isinstance(m, _DROPOUT_MODULES):
        if not any(s in type(m).__name__ for s in _DROPOUT_NAME_PARTS):
            return False, None
        if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
            return False, None
    for attr in ('p', 'drop_prob', 'prob', 'drop_rate'):
        value = getattr(m, attr, None)
        if isinstance(value, (int, float)):
            return True, float(value)
    return True, None


def _caller() -> str:
    """``Class.method`` of the first frame outside torch and this module (names a functional call)."""
    frame = inspect.currentframe()
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return '?'
    return getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)


_TORCH_DIR = os.path.dirname(torch.__file__)


class _Tracer(TorchFunctionMode):
    """Builds the data-flow graph: ``__torch_function__`` adds op nodes; hooks name them and make dropout
    modules single nodes."""

    def __init__(self, names: Dict[nn.Module, str], root: nn.Module) -> None:
        super().__init__()
        self.names = names
        self.root = root
        self.nodes: List[_Node] = []
        self.producer: Dict[int, int] = {}
        self.alive: List[torch.Tensor] = []     # keeps traced tensors alive so their ids stay unique
        self.stack: List[nn.Module] = []
        self.frames: List[Tuple[bool, List[int], Tuple[int, ...]]] = []
        self.atomic = 0
        self.paused = False
        self.outputs: List[int] = []             # nodes whose tensors the model returns
        self.kinds: Dict[nn.Module, Tuple[bool, float | None]] = {}   # _dropout_module_p, once per module

    def _dropout_kind(self, module: nn.Module) -> Tuple[bool, float | None]:
        kind = self.kinds.get(module)
        if kind is None:
            kind = self.kinds[module] = _dropout_module_p(module)
        return kind

    def _add(self, kind: str, name: str, op: str, inputs: List[int], in_shape: Tuple[int, ...],
             outputs: Iterable[torch.Tensor], **extra: Any) -> _Node:
        outs = [t for t in outputs if t.numel() > 0]
        node = _Node(len(self.nodes), kind, name, op, list(dict.fromkeys(inputs)), in_shape,
                     tuple(outs[0].shape) if outs else (), **extra)
        self.nodes.append(node)
        for t in outs:
            self.producer[id(t)] = node.idx
            self.alive.append(t)
        return node

    def source(self, t: torch.Tensor) -> None:
        self._add('input', 'input', 'input', [], tuple(t.shape), [t])

    def _inputs(self, args: Any, kwargs: Dict[str, Any] | None = None) -> Tuple[List[int], Tuple[int, ...]]:
        idxs: List[int] = []
        shape: Tuple[int, ...] = ()
        for t in _tensors(args) + _tensors(kwargs) if kwargs else _tensors(args):
            if id(t) in self.producer and t.numel() > 0:   # an empty slice carries nothing
                if not idxs:
                    shape = tuple(t.shape)
                idxs.append(self.producer[id(t)])
        return idxs, shape

    def _module(self) -> str:
        """Qualified name of the innermost running module ('' for the model itself)."""
        if not self.stack or self.stack[-1] is self.root:
            return ''
        return self.names.get(self.stack[-1], type(self.stack[-1]).__name__)

    def _functional_name(self, op: str) -> str:
        where = self._module()
        return f'{where}: {op} @ {_caller()}' if where else f'{op} @ {_caller()}'

    # module hooks ------------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self.stack.append(module)
        if self.atomic == 0 and self._dropout_kind(module)[0]:
            self.atomic += 1
            with self._paused():
                inputs, shape = self._inputs(args)
            self.frames.append((True, inputs, shape))
        else:
            self.frames.append((False, [], ()))

    def post_hook(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        self.stack.pop()
        if module is self.root:
            with self._paused():
                self.outputs = self._inputs(output)[0]
        recorded, inputs, in_shape = self.frames.pop()
        if not recorded:
            return None
        self.atomic -= 1
        if not isinstance(output, torch.Tensor):
            return None
        with self._paused():
            out = output.view_as(output)  # a fresh tensor object, so identity-returning modules get their own node
            self._add('dropout', self.names.get(module, type(module).__name__), type(module).__name__, inputs,
                      in_shape, [out], p=self._dropout_kind(module)[1])
        return out

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    # tensor ops --------------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.paused or self.atomic:
            return result
        outs = _tensors(result)
        if not outs:
            return result
        op = getattr(func, '__name__', str(func))
        if func in _RANDOM_FNS:
            self._add('random', op, op, [], (), outs, random=True)
            return result
        if func in _FACTORY_FNS:
            return result
        inputs, in_shape = self._inputs(args, kwargs)
        if not inputs and func not in _DROPOUT_FNS:       # a dropout of a parameter (a position embedding) counts
            return result
        random_in = [i for i in inputs if self.nodes[i].random]
        data_in = [i for i in inputs if not self.nodes[i].random]
        if random_in and not data_in:
            self._add('other', op, op, inputs, in_shape, outs, random=True)
        elif random_in:
            # data times a random mask: a hand-rolled dropout (timm's functional drop_path, drop_block_2d, ...)
            if all(self.nodes[i].mask for i in data_in):    # the same mask's rescale: one dropout, not two
                self._add('other', op, op, data_in, in_shape, outs)
            else:
                self._add('dropout', self._functional_name(f'random mask ({op})'), 'random mask', data_in,
                          in_shape, outs, mask=True)
        elif func in _DROPOUT_FNS:
            p = float(_arg(args, kwargs, 1, 'p', 0.5))
            train_key = 'training' if func.__module__ == F.__name__ else 'train'
            if _arg(args, kwargs, 2, train_key, True) is False:
                p = 0.0                                     # training=False never drops
            self._add('dropout', self._functional_name(_DROPOUT_FNS[func]), _DROPOUT_FNS[func], inputs,
                      in_shape, outs, p=p)
        elif func is F.scaled_dot_product_attention:
            name = self._module() or op
            p = float(_arg(args, kwargs, 4, 'dropout_p', 0.0))
            if 'dropout_p' in kwargs or len(args) > 4:   # a dropout site, active or not (timm passes 0 in eval)
                # softmax(q k^T) is dropped, then multiplied by v: a dropout followed by a weight-like product
                qk = self._inputs((args[:2], kwargs.get('query'), kwargs.get('key')))[0]
                v = self._inputs((args[2:3], kwargs.get('value')))[0]
                drop = self._add('dropout', self._functional_name('F.scaled_dot_product_attention(dropout_p)'),
                                 'F.sdpa dropout', qk or inputs, in_shape, [], p=p)
                drop.out_shape = tuple(outs[0].shape)
                self._add('linear', name, op, [drop.idx, *v], in_shape, outs)
            else:
                self._add('linear', name, op, inputs, in_shape, outs)
        elif func in _LINEAR_FNS:
            self._add('linear', self._module() or op, op, inputs, in_shape, outs)
        elif func in _ADD_FNS and len(set(inputs)) >= 2:
            self._add('add', 'add', 'add', inputs, in_shape, outs)
        elif func in (F.batch_norm, torch.batch_norm, F.instance_norm):
            running_var = (_arg(args, kwargs, 4, 'running_var') if func is torch.batch_norm
                           else _arg(args, kwargs, 2, 'running_var'))
            # without running statistics the norm uses batch statistics at test time too: no shift
            kind = 'bn' if running_var is not None else 'other'
            self._add(kind, self._module() or self._functional_name(op), op, inputs, in_shape, outs)
        else:
            positions = 0
            out_shape = tuple(outs[0].shape)
            if func in _REDUCE_FNS or (func in _SELECT_FNS and len(in_shape) == 3 and len(out_shape) == 2):
                positions = _pool_positions(in_shape, out_shape)
            if positions:
                self._add('pool', self._module() or op, op, inputs, in_shape, outs, positions=positions)
            else:
                self._add('other', op, op, inputs, in_shape, outs)
        return result


