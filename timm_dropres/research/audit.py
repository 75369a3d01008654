"""Placement audit: where does every dropout of any model sit, and does a BatchNorm consume it?

``audit(model)`` runs one forward pass in train mode on a random input and records an **execution
trace**: module hooks name the modules, a ``TorchFunctionMode`` records every tensor op (inside norm
modules too, so a DropBlock that ``BatchNormAct2d`` runs after its ``F.batch_norm`` is seen). Every tensor
is tied to the op that produced it, which gives a data-flow graph of the run. Why not ``torch.fx``:
symbolic tracing fails on data-dependent control flow (``if self.training``, ``if self.drop_rate``) that
many models have; an execution trace sees exactly what ran. The model's parameters, BN buffers,
train/eval flags and the RNG state are restored afterwards.

Each dropout-like op (``nn.Dropout*`` including ``ResidualDropout``, ``F.dropout*``, ``DropBlock``,
``DropPath``/stochastic depth, the dropout inside ``F.scaled_dot_product_attention``, and any tensor
multiplied by a random mask) gets a **location** (:data:`LOCATIONS`) and a **verdict**
(:data:`VERDICTS`). Both vocabularies are defined once, here; ``docs/placement.md`` states the same rules
and a test keeps the two in sync.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from ..models.placement import BRANCH, GUIDELINE_LOCATIONS, HAZARD, HEAD_1X1, HEAD_BEFORE, OFF, OK
from ..models.placement import verdict as _verdict

__all__ = [
    'AuditError', 'AuditEntry', 'AuditReport', 'audit', 'load_model', 'format_report', 'describe_rules', 'format_p',
    'VERDICTS', 'LOCATIONS', 'TERMS', 'GUIDELINE_LOCATIONS', 'TABLE_COLUMNS', 'OK', 'OFF', 'HAZARD',
    'STEM', 'BRANCH', 'SHORTCUT', 'MAIN', 'BODY', 'UNUSED', 'HEAD_BEFORE', 'HEAD_AFTER', 'HEAD_1X1', 'HEAD',
]

# ----------------------------------------------------------------------------------------------------------
# the vocabulary: one definition, used by the library, the CLI (--help) and docs/placement.md
# ----------------------------------------------------------------------------------------------------------

# OK/OFF/HAZARD, the guideline locations and the verdict rule come from models/placement.py, which convert() reads too
STEM, SHORTCUT, MAIN, BODY, UNUSED = 'stem', 'shortcut', 'main path', 'body', 'unused'
HEAD_AFTER, HEAD = 'head, after pooling', 'head'

#: Verdict -> its rule. Every active dropout gets exactly one.
VERDICTS: Dict[str, str] = {
    HAZARD: 'a BatchNorm with running statistics reads the dropped activations before they reach a residual '
            'merge or a global pool over more than one position (variance shift); weight layers, activations, '
            'concatenations and sums of parallel branches in between do not stop it',
    OK: 'no hazard, and the location is one of the guideline positions: residual branch, head before '
        'pooling, head on a 1x1 map',
    OFF: 'no hazard, but not where the paper puts dropout (any other location)',
}

#: Location (site label) -> its rule, in the order the audit tests them.
LOCATIONS: Dict[str, str] = {
    UNUSED: 'the dropped values never reach the model output (dead code: the dropout has no effect)',
    BRANCH: 'the dropped values reach the next residual merge through its branch operand only',
    SHORTCUT: 'the dropped values reach the next residual merge through its skip operand only',
    MAIN: 'the dropped values reach both operands of the next residual merge, and a residual merge lies '
          'upstream (a block output that feeds the next block)',
    STEM: 'the dropped values reach both operands of the next residual merge, and no residual merge lies upstream',
    HEAD_AFTER: 'no residual merge downstream, and a head pool over more than one position lies upstream: the '
                'dropout acts on the pooled vector or on what the head computes from it',
    HEAD_BEFORE: 'no residual merge downstream; the head pool, over more than one position, follows with no '
                 'weight layer and no BatchNorm in between (activations, reshapes and concatenations only)',
    HEAD_1X1: 'as head before / after pooling, but the head pool averages a single position (a 1x1 map): '
              'before and after pooling are the same point',
    BODY: 'no residual merge downstream and none of the above, but a weight layer or BatchNorm follows '
          '(dense or plain layers, a branch of a parallel sum that never meets a skip path)',
    HEAD: 'none of the above: nothing downstream merges, pools, weighs or normalises the dropped values '
          '(dropout on a feature-map output)',
}

#: Terms the rules use, defined once.
TERMS: Dict[str, str] = {
    'residual merge': "an addition of a branch and its skip path. The fork is the two operands' latest common "
                      'ancestor; an operand is skip-like when the paths from the fork to it hold no weight layer, '
                      "or exactly one while the sum's shape differs from the fork's (a projection shortcut). A "
                      'residual merge has exactly one skip-like operand; a sum of two parallel branches (both or '
                      'neither skip-like) is none',
    'global pool': 'an average/max pool, a mean/sum/max reduction or a class-token selection that collapses every '
                   'position of a map (B, C, H, W) or token sequence (B, N, C) to one value per channel; it '
                   'averages N positions, N >= 1',
    'head pool': 'a global pool from whose output no multi-position tensor is computed again (unlike a '
                 'squeeze-excitation gate)',
}

#: Columns of the table; ``AuditEntry.row()`` and the JSON entries carry the same keys.
TABLE_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ('index', '#'), ('op', 'op'), ('name', 'name'), ('p', 'p'), ('location', 'location'), ('verdict', 'verdict'),
    ('why', 'why / downstream'),
)


class AuditError(RuntimeError):
    """The model could not be built or traced; the message says why and what to try."""


@dataclass(frozen=True)
class AuditEntry:
    """One dropout-like op found in the trace.

    Attributes:
        index: position in execution order (the table's ``#``).
        name: module qualified name, or ``"<module>: F.dropout @ Class.method"`` for functional calls.
        op: ``Dropout``, ``ResidualDropout``, ``F.dropout``, ``DropBlock2d``, ``DropPath``, ...
        p: drop probability, ``None`` when it cannot be read.
        location: one of :data:`LOCATIONS`.
        hazard: a running-statistics BatchNorm reads the dropped activations (see :data:`VERDICTS`).
        consumer: that BatchNorm (when ``hazard``).
        path: the ops from the dropout to where its walk ends.
        note: why the verdict is not ``ok``, or what else is worth knowing.
    """

    index: int
    name: str
    op: str
    p: float | None
    location: str
    hazard: bool
    consumer: str | None
    path: str
    note: str = ''

    @property
    def verdict(self) -> str:
        """``ok``, ``off-guideline`` or ``hazard``, from :data:`VERDICTS`."""
        return _verdict(self.location, self.hazard)

    @property
    def active(self) -> bool:
        """Whether the op drops anything (p > 0, or p unknown)."""
        return self.p is None or self.p > 0

    @property
    def why(self) -> str:
        """The table's last column: the note, else the downstream path."""
        return self.note or self.path

    def row(self) -> Dict[str, Any]:
        """The table's columns (:data:`TABLE_COLUMNS`) as a dict."""
        return dict(index=self.index, op=self.op, name=self.name, p=self.p, location=self.location,
                    verdict=self.verdict, why=self.why)

    def as_dict(self) -> Dict[str, Any]:
        """The table's columns plus ``active``, ``hazard``, ``consumer``, ``path`` and ``note``."""
        return dict(self.row(), active=self.active, hazard=self.hazard, consumer=self.consumer, path=self.path,
                    note=self.note)


@dataclass
class AuditReport:
    """All dropout-like ops of one model, in execution order.

    Attributes:
        model: the model's label (timm name or class name).
        input_shape: the traced input's shape.
        entries: one :class:`AuditEntry` per dropout-like op.
        has_bn: whether any BatchNorm with running statistics ran.
        bn_merges: how many residual merges have a running-statistics BatchNorm in their branch (between the fork
            and the merge): the model is a BatchNorm residual network when it is above 0.
    """

    model: str
    input_shape: Tuple[int, ...]
    entries: List[AuditEntry] = field(default_factory=list)
    has_bn: bool = True
    bn_merges: int = 0

    @property
    def hazards(self) -> List[AuditEntry]:
        """Hazards of dropouts that actually drop (p > 0): what ``--strict`` fails on."""
        return [e for e in self.entries if e.hazard and e.active]

    @property
    def compliant(self) -> bool:
        """Every active dropout is ``ok``."""
        return all(e.verdict == OK for e in self.entries if e.active)

    def summary(self) -> Dict[str, int]:
        """Verdict -> number of active ops with it (the table's summary line)."""
        return {v: sum(e.verdict == v for e in self.entries if e.active) for v in (OK, HAZARD, OFF)}

    def as_dict(self) -> Dict[str, Any]:
        """What ``--json`` writes: the table's rows and summary, plus the model-level fields."""
        return dict(model=self.model, input_shape=list(self.input_shape), has_bn=self.has_bn,
                    columns=[key for key, _ in TABLE_COLUMNS], entries=[e.as_dict() for e in self.entries],
                    summary=self.summary(), hazards=len(self.hazards))


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


# ----------------------------------------------------------------------------------------------------------
# graph analysis
# ----------------------------------------------------------------------------------------------------------

class _Graph:
    """The traced graph with what the rules need: ancestors, residual merges, head pools."""

    def __init__(self, nodes: List[_Node], outputs: List[int]) -> None:
        self.nodes = nodes
        self.outputs = outputs
        n = len(nodes)
        self.cons: List[List[int]] = [[] for _ in nodes]
        for node in nodes:
            for i in node.inputs:
                self.cons[i].append(node.idx)
        # ancestors (excluding the node) as bitsets: node i is an ancestor of n iff anc[n] >> i & 1
        self.anc: List[int] = [0] * n
        for node in nodes:
            bits = 0
            for i in node.inputs:
                bits |= self.anc[i] | (1 << i)
            self.anc[node.idx] = bits
        # a node is "spatial downstream" if a multi-position tensor is computed from it
        reach_multi = [False] * n
        for node in reversed(nodes):
            reach_multi[node.idx] = any(_multi_position(nodes[c].out_shape) or reach_multi[c]
                                        for c in self.cons[node.idx])
        self.head_pools: Set[int] = {x.idx for x in nodes if x.kind == 'pool' and not reach_multi[x.idx]}
        self.merges: Dict[int, Tuple[int, int]] = {}        # residual merge -> (branch operand, skip operand)
        for node in nodes:
            if node.kind == 'add':
                operands = self._residual_operands(node)
                if operands is not None:
                    self.merges[node.idx] = operands

    def is_ancestor(self, a: int, n: int) -> bool:
        return a == n or bool(self.anc[n] >> a & 1)

    def _weight_depth(self, fork: int, end: int) -> int:
        """The most weight layers on a path from ``fork`` to ``end`` (``end`` counted, ``fork`` not)."""
        on_path = (self.anc[end] | (1 << end)) >> fork
        depth = {fork: 0}
        for k in range(fork + 1, end + 1):
            if not on_path >> (k - fork) & 1:
                continue
            ins = [depth[i] for i in self.nodes[k].inputs if i in depth]
            if ins:
                depth[k] = max(ins) + (self.nodes[k].kind == 'linear')
        return depth.get(end, 0)

    def _residual_operands(self, add: _Node) -> Tuple[int, int] | None:
        if len(add.inputs) != 2:
            return None
        u, v = add.inputs
        common = (self.anc[u] | (1 << u)) & (self.anc[v] | (1 << v))
        if not common:
            return None
        fork = common.bit_length() - 1
        reshaped = self.nodes[fork].out_shape != add.out_shape

        def skip_like(s: int) -> bool:
            depth = self._weight_depth(fork, s)
            return depth == 0 or (depth == 1 and reshaped)

        su, sv = skip_like(u), skip_like(v)
        if su == sv:
            return None                                      # parallel branches, not branch + skip
        return (v, u) if su else (u, v)

    def walk(self, start: int, stop: Callable[[_Node], bool]) -> Tuple[List[int], Dict[int, int]]:
        """BFS downstream of ``start`` that does not pass nodes where ``stop`` holds; returns (stops, parents)."""
        parent: Dict[int, int] = {}
        hits: List[int] = []
        todo = deque([start])
        seen = {start}
        while todo:
            i = todo.popleft()
            for j in self.cons[i]:
                if j in seen:
                    continue
                seen.add(j)
                parent[j] = i
                if stop(self.nodes[j]):
                    hits.append(j)
                else:
                    todo.append(j)
        return hits, parent

    def reaches_directly(self, start: int, target: int) -> bool:
        """Whether ``target`` is reached from ``start`` with no weight layer, BatchNorm or residual merge between."""
        hits, _ = self.walk(start, lambda n: n.kind in ('linear', 'bn') or n.idx in self.merges or n.idx == target)
        return target in hits

    def path(self, start: int, end: int, parent: Dict[int, int]) -> str:
        chain = [end]
        while chain[-1] != start:
            chain.append(parent[chain[-1]])
        shown = []
        for i in reversed(chain[:-1]):
            n = self.nodes[i]
            if n.kind in ('bn', 'linear'):
                shown.append(f'{n.kind}:{n.name}')
            elif n.kind == 'add':
                shown.append('add' if i in self.merges else 'sum')
            elif n.kind == 'pool':
                shown.append(f'pool({n.positions})')
            elif n.kind == 'dropout':
                shown.append('dropout')
            elif i == end:
                shown.append(n.op)
        return ' -> '.join(shown)


def _classify(d: _Node, g: _Graph, index: int) -> AuditEntry:
    nodes = g.nodes
    # hazard: a running-statistics BN before a residual merge or a global pool over > 1 position
    hits, parent = g.walk(d.idx, lambda n: n.kind == 'bn' or n.idx in g.merges
                          or (n.kind == 'pool' and n.positions > 1))
    bns = sorted(h for h in hits if nodes[h].kind == 'bn')
    hazard = bool(bns)
    consumer = nodes[bns[0]].name if hazard else None

    # location: the next residual merge, else the head pool
    stops, lparent = g.walk(d.idx, lambda n: n.idx in g.merges or n.idx in g.head_pools)
    merges = sorted(h for h in stops if h in g.merges)
    pools_after = [p for p in g.head_pools if p != d.idx and g.is_ancestor(p, d.idx)]
    pools_before = sorted(h for h in stops if h in g.head_pools)
    end = None
    if g.outputs and not any(g.is_ancestor(d.idx, o) for o in g.outputs):
        location = UNUSED
    elif merges:
        end = merges[0]
        branch, skip = g.merges[end]
        via_branch, via_skip = g.is_ancestor(d.idx, branch), g.is_ancestor(d.idx, skip)
        if via_branch and via_skip:
            upstream = any(g.is_ancestor(m, d.idx) for m in g.merges if m < d.idx)
            location = MAIN if upstream else STEM
        else:
            location = BRANCH if via_branch else SHORTCUT
    elif pools_after:
        pool = nodes[max(pools_after)]
        location = HEAD_1X1 if pool.positions == 1 else HEAD_AFTER
    elif pools_before and g.reaches_directly(d.idx, pools_before[0]):
        end = pools_before[0]
        location = HEAD_1X1 if nodes[end].positions == 1 else HEAD_BEFORE
    else:
        weights, _ = g.walk(d.idx, lambda n: n.kind in ('linear', 'bn'))
        location = BODY if weights else HEAD
        if pools_before:
            end = pools_before[0]

    if hazard:
        path = g.path(d.idx, bns[0], parent)
        note = f'{consumer} normalises dropped activations (variance shift)'
    else:
        path = g.path(d.idx, end, lparent) if end is not None else '(output)'
        note = {
            HEAD_AFTER: 'paper: drop the feature map before global pooling',
            HEAD_1X1: 'the final map is 1x1: before and after pooling are the same point',
            MAIN: 'dropout on the main path, outside any residual branch',
            STEM: 'dropout in the stem, before the first residual merge',
            SHORTCUT: 'dropout in the skip path of a residual merge',
            UNUSED: 'its output never reaches the model output: the dropout has no effect',
            BODY: 'dropout outside any residual branch, followed by weight layers or norms',
            HEAD: 'nothing downstream merges, pools, weighs or normalises the dropped values',
        }.get(location, '')
        pooled_bns = _bns_behind_pools(d, g, hits)
        if pooled_bns:
            bn, pool = pooled_bns
            extra = (f'{bn} reads it after a global pool over {pool.positions} positions '
                     f'(noise averaged about {pool.positions}x down, not a hazard)')
            note = f'{note}; {extra}' if note else extra
    return AuditEntry(index=index, name=d.name, op=d.op, p=d.p, location=location, hazard=hazard,
                      consumer=consumer, path=path, note=note)


def _bns_behind_pools(d: _Node, g: _Graph, hits: List[int]) -> Tuple[str, _Node] | None:
    """The first BN that reads the dropped values through a global pool the hazard walk stopped at."""
    for h in sorted(hits):
        pool = g.nodes[h]
        if pool.kind != 'pool':
            continue
        found, _ = g.walk(h, lambda n: n.kind == 'bn' or n.idx in g.merges or (n.kind == 'pool' and n.positions > 1))
        bns = sorted(f for f in found if g.nodes[f].kind == 'bn')
        if bns:
            return g.nodes[bns[0]].name, pool
    return None


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------

def load_model(spec: str | nn.Module, **kwargs: Any) -> Tuple[nn.Module, str]:
    """A model from an ``nn.Module``, a timm name or a saved folder.

    Args:
        spec: an ``nn.Module``, a timm model name (``resnet50``, ``resnet50_dropres.a1_in1k``) or
            ``local-dir:<folder>`` (a folder with ``config.json`` and weights).
        **kwargs: passed to ``timm.create_model`` when ``spec`` is a name.

    Returns:
        ``(model, label)``.

    Raises:
        AuditError: unknown name, a folder without ``config.json``, keywords given with a module, or a
            build that fails.
    """
    if isinstance(spec, nn.Module):
        if kwargs:
            raise AuditError(f'model keywords {sorted(kwargs)} only apply to a timm model name; '
                             f'got an nn.Module ({type(spec).__name__}) already built')
        return spec, type(spec).__name__
    if not isinstance(spec, str) or not spec:
        raise AuditError(f'model must be an nn.Module, a timm model name or local-dir:<folder>, got {spec!r}')
    import timm

    import timm_dropres  # noqa: F401  (registers *_dropres and the CIFAR networks)

    if spec.startswith('local-dir:'):
        folder = spec.split(':', 1)[1]
        if not os.path.isfile(os.path.join(folder, 'config.json')):
            raise AuditError(f'{spec!r}: no config.json in {folder!r}; expected a folder written by '
                             'timm.models.save_for_hf or timm_dropres.hub.export.save_pretrained_folder')
        try:
            return timm.create_model(spec, pretrained=True, **kwargs), spec
        except Exception as e:  # noqa: BLE001 - turned into one clear message
            raise AuditError(f'could not build {spec!r}: {type(e).__name__}: {e}') from e
    if spec.startswith('hf-hub:') or not timm.is_model(spec.split('.')[0]):
        if spec.startswith('hf-hub:'):
            hint = 'the Hub is not reachable here; use local-dir:<folder>'
        else:
            close = timm.list_models(f'*{spec.split(".")[0][:8]}*')[:8]
            hint = f'similar names: {close}' if close else 'see timm.list_models()'
        raise AuditError(f'unknown model {spec!r}: not a registered timm model ({hint})')
    try:
        return timm.create_model(spec, pretrained=False, **kwargs), spec
    except Exception as e:  # noqa: BLE001
        raise AuditError(f'could not build {spec!r} with {kwargs}: {type(e).__name__}: {e}') from e


def _input_shape(model: nn.Module, input_size: Sequence[int] | None, batch_size: int,
                 model_kwargs: Dict[str, Any]) -> Tuple[int, ...]:
    if input_size is None:
        from timm.data import resolve_model_data_config

        # the create_model keywords that change the input the model expects
        args = {k: model_kwargs[k] for k in ('img_size', 'in_chans') if isinstance(model_kwargs.get(k), int)}
        input_size = resolve_model_data_config(model, args=args)['input_size']
        if 'in_chans' in args:
            input_size = (args['in_chans'], *input_size[1:])
    shape = tuple(int(s) for s in input_size)
    if len(shape) != 3 or min(shape) < 1:
        raise AuditError(f'input_size must be (C, H, W) with positive sizes, got {tuple(input_size)}')
    return (batch_size, *shape)


def _check_forward(module: nn.Module, label: str) -> None:
    """One image batch must be enough: refuse forwards that need other inputs, with a clear message."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    if not positional or len(required) > 1:
        sig = ', '.join(p.name for p in params)
        raise AuditError(
            f'{label}.forward({sig}) needs {"no input" if not positional else "inputs " + str(required)}: the '
            'audit feeds one image batch (B, C, H, W), so models whose forward needs other inputs (token ids, '
            'masks, several tensors) are not supported; wrap the model in a module whose forward(x) builds them')


def audit(
        model: str | nn.Module,
        *,
        input_size: Sequence[int] | None = None,
        batch_size: int = 2,
        **model_kwargs: Any,
) -> AuditReport:
    """Trace ``model`` once and classify every dropout-like op (see :data:`LOCATIONS`, :data:`VERDICTS`).

    Args:
        model: an ``nn.Module``, a timm model name or ``local-dir:<folder>`` (see :func:`load_model`).
        input_size: ``(C, H, W)`` of the traced input; by default what
            ``timm.data.resolve_model_data_config`` gives for the model (``img_size`` / ``in_chans`` keywords
            taken into account).
        batch_size: traced batch size, at least 2 (BatchNorm in train mode needs two values).
        **model_kwargs: passed to ``timm.create_model`` when ``model`` is a name.

    Returns:
        The report, one entry per dropout-like op in execution order.

    Raises:
        AuditError: the model cannot be built, its forward needs other inputs than one image batch, or the
            traced forward pass raises (one line, with what to try).
    """
    if batch_size < 2:
        raise AuditError(
            f'batch_size must be >= 2 (BatchNorm needs more than one value in train mode), got {batch_size}')
    module, label = load_model(model, **model_kwargs)
    _check_forward(module, label)
    shape = _input_shape(module, input_size, batch_size, model_kwargs)
    named = list(module.named_modules())
    names = {m: (n or type(module).__name__) for n, m in named}
    tracer = _Tracer(names, module)
    was_training = [m for _, m in named if m.training]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    # process-wide module hooks: two registrations instead of two per module
    handles = [register_module_forward_pre_hook(tracer.pre_hook), register_module_forward_hook(tracer.post_hook)]
    try:
        device = next(iter(module.parameters()), torch.empty(0)).device
        if len(was_training) < len(named):
            module.train()
        forked = [] if device.type in ('cpu', 'meta') else [device]
        with torch.random.fork_rng(devices=forked):                 # the input and the dropout masks
            x = torch.randn(shape, device=device)
            tracer.source(x)
            with torch.no_grad(), tracer:
                module(x)
    except Exception as e:  # noqa: BLE001 - any failure of a user model becomes one clear message
        raise AuditError(
            f'could not trace {label}: a train-mode forward pass on a random input of shape {tuple(shape)} raised '
            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}. The audit feeds one float image '
            'batch; if the model needs another size, pass input_size=(C, H, W) (CLI: --input-size C H W); '
            'models whose forward needs other inputs (token ids, masks) are not supported.') from e
    finally:
        for h in handles:
            h.remove()
        if len(was_training) < len(named):
            module.eval()
            for m in was_training:
                m.training = True
        with torch.no_grad(), contextlib.suppress(Exception):
            for b, saved in buffers:
                b.copy_(saved)

    graph = _Graph(tracer.nodes, tracer.outputs)
    drops = [n for n in tracer.nodes if n.kind == 'dropout']
    entries = [_classify(n, graph, i) for i, n in enumerate(drops)]
    has_bn = any(n.kind == 'bn' for n in tracer.nodes)
    return AuditReport(model=label, input_shape=tuple(shape), entries=entries, has_bn=has_bn,
                       bn_merges=_bn_merges(graph))


def _bn_merges(g: _Graph) -> int:
    """Residual merges whose branch operand is computed from a BN that is itself computed from the fork."""
    bns = [n.idx for n in g.nodes if n.kind == 'bn']
    count = 0
    for branch, skip in g.merges.values():
        common = (g.anc[branch] | (1 << branch)) & (g.anc[skip] | (1 << skip))
        fork = common.bit_length() - 1
        count += any(b > fork and g.is_ancestor(fork, b) and g.is_ancestor(b, branch) for b in bns)
    return count


def format_p(p: float | None) -> str:
    """The table's ``p`` cell.

    Args:
        p: a drop probability, or ``None`` when it could not be read.

    Returns:
        ``p`` in ``%g`` format, or ``'?'``.
    """
    return '?' if p is None else f'{p:g}'


def format_report(report: AuditReport, *, verbose: bool = False) -> str:
    """The audit as a text table, one row per dropout-like op, with a one-line summary.

    Args:
        report: what :func:`audit` returned.
        verbose: show the downstream path next to the note.

    Returns:
        The table; its columns are :data:`TABLE_COLUMNS`, the same keys ``--json`` writes.
    """
    head = f'{report.model}: {len(report.entries)} dropout-like op(s), traced on input {tuple(report.input_shape)}'
    if not report.entries:
        return head + '\nno dropout-like op ran: nothing to audit'
    rows = [tuple(title for _, title in TABLE_COLUMNS)]
    for e in report.entries:
        why = f'{e.note}; path: {e.path}' if verbose and e.note else e.why
        p = format_p(e.p) if e.active else f'{format_p(e.p)} (inactive)'
        rows.append((str(e.index), e.op, e.name, p, e.location, e.verdict, why))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = [head]
    for r in rows:
        lines.append('  '.join(f'{v:<{w}}' for v, w in zip(r[:-1], widths, strict=True)) + '  ' + r[-1])
    if not report.has_bn:
        lines.append('no BatchNorm with running statistics ran: variance shift cannot occur in this model')
    counts = report.summary()
    lines.append(f'summary: {counts[OK]} {OK}, {counts[HAZARD]} {HAZARD}, {counts[OFF]} {OFF} (active ops only)')
    return '\n'.join(lines)


def describe_rules() -> str:
    """The verdicts, locations and terms as text (the CLI's ``--help`` epilog shows it).

    Returns:
        One line per verdict, location (in the order they are tested) and term, with its rule.
    """
    lines = ['verdicts:']
    lines += [f'  {k}: {v}' for k, v in VERDICTS.items()]
    lines.append('locations (tested in this order):')
    lines += [f'  {k}: {v}' for k, v in LOCATIONS.items()]
    lines.append('terms:')
    lines += [f'  {k}: {v}' for k, v in TERMS.items()]
    return '\n'.join(lines)
