"""Placement audit: where does every dropout of any model sit, and does a BatchNorm consume it?

``audit(model)`` runs one forward pass in train mode on a random input and records an **execution
trace**: forward hooks see modules, a ``TorchFunctionMode`` sees the tensor ops between them (the
residual ``+``, functional ``F.dropout``, ``x.mean((2, 3))``). Every tensor is tied to the op that
produced it, which gives a data-flow graph of the run. Why not ``torch.fx``: symbolic tracing fails on
data-dependent control flow (``if self.training``, ``if self.drop_rate``) that many models have; an
execution trace sees exactly what ran. The model's parameters, BN buffers, train/eval flags and the RNG
state are restored afterwards.

Each dropout-like op (``nn.Dropout*`` including ``ResidualDropout``, ``F.dropout*``, ``DropBlock``,
``DropPath``/stochastic depth) is classified by walking the graph:

* **location**: ``stem`` (before any residual addition, on the main path), ``residual branch`` (its
  output reaches only one input of the next residual addition), ``main path`` (both inputs: the
  dropped tensor is the block output that feeds branch and shortcut alike), ``head, before pooling``
  (reaches a global pooling without a residual addition), ``head, after pooling`` (drops a pooled,
  spatially collapsed tensor), ``head`` (nothing downstream pools or adds).
* **hazard**: a running-statistics BatchNorm is reached downstream before the output is merged into a
  residual sum or pooled. Weight layers and activations in between do not stop the walk: variance shift
  passes through linear layers, so ``dropout -> conv -> BN`` is a hazard while ``dropout -> conv ->
  (+ shortcut)`` is the guideline.
* **verdict**: ``ok`` (residual branch or head-before-pool, no hazard), ``HAZARD``, or ``off-guideline``
  (no hazard, but not where the paper puts dropout: after pooling, on the main path).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ['AuditError', 'AuditEntry', 'AuditReport', 'audit', 'load_model', 'format_report']

_TORCH_DIR = os.path.dirname(torch.__file__)

OK, HAZARD, OFF = 'ok', 'HAZARD', 'off-guideline'
STEM, BRANCH, MAIN = 'stem', 'residual branch', 'main path'
HEAD_BEFORE, HEAD_AFTER, HEAD = 'head, before pooling', 'head, after pooling', 'head'


class AuditError(RuntimeError):
    """The model could not be built or traced; the message says why and what to try."""


@dataclass(frozen=True)
class AuditEntry:
    """One dropout-like op found in the trace."""

    name: str                   # module qualified name, or "F.dropout @ Class.method" for functional calls
    op: str                     # Dropout, ResidualDropout, F.dropout, DropBlock2d, DropPath, ...
    p: float | None          # drop probability (None when it cannot be read)
    location: str
    hazard: bool
    consumer: str | None     # the BN that consumes the dropped activations (when hazard)
    path: str                   # the ops from the dropout to where its walk ends
    verdict: str
    note: str = ''

    @property
    def active(self) -> bool:
        return self.p is None or self.p > 0

    def as_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), active=self.active)


@dataclass
class AuditReport:
    """All dropout-like ops of one model, in execution order."""

    model: str
    input_shape: Tuple[int, ...]
    entries: List[AuditEntry] = field(default_factory=list)
    has_bn: bool = True

    @property
    def hazards(self) -> List[AuditEntry]:
        """Hazards of dropouts that actually drop (p > 0): what ``--strict`` fails on."""
        return [e for e in self.entries if e.hazard and e.active]

    @property
    def compliant(self) -> bool:
        return all(e.verdict == OK for e in self.entries if e.active)

    def as_dict(self) -> Dict[str, Any]:
        return dict(model=self.model, input_shape=list(self.input_shape), has_bn=self.has_bn,
                    entries=[e.as_dict() for e in self.entries], hazards=len(self.hazards))


# ----------------------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Node:
    idx: int
    kind: str                   # input | dropout | bn | linear | add | pool | other
    name: str
    op: str
    inputs: List[int]
    in_shape: Tuple[int, ...] = ()
    out_shape: Tuple[int, ...] = ()
    p: float | None = None


_DROPOUT_FNS = {
    F.dropout: 'F.dropout', F.dropout1d: 'F.dropout1d', F.dropout2d: 'F.dropout2d', F.dropout3d: 'F.dropout3d',
    F.alpha_dropout: 'F.alpha_dropout', F.feature_alpha_dropout: 'F.feature_alpha_dropout',
    torch.dropout: 'torch.dropout', torch.feature_dropout: 'torch.feature_dropout',
}
_LINEAR_FNS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               F.linear, torch.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm, torch.addmm}
_ADD_FNS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
            torch.Tensor.__iadd__}
_POOL_FNS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
             F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
             F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.mean, torch.Tensor.mean, torch.amax,
             torch.Tensor.amax, torch.sum, torch.Tensor.sum}
_POOL_MODULES: Tuple[type, ...] = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                                   nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool2d)
_STOCHASTIC_DEPTH_NAMES = ('DropPath', 'DropBlock', 'StochasticDepth')


def _spatial(shape: Sequence[int]) -> int:
    return math.prod(shape[2:]) if len(shape) >= 3 else 1


def _is_global_pool(in_shape: Sequence[int], out_shape: Sequence[int]) -> bool:
    """A pooling that collapses a spatial map (H*W > 1) to one position."""
    return len(in_shape) >= 3 and _spatial(in_shape) > 1 and (len(out_shape) <= 2 or _spatial(out_shape) == 1)


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _module_kind(m: nn.Module) -> Tuple[str, float | None] | None:
    """(kind, p) for modules traced as one node; None for modules whose inner ops are traced."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return 'dropout', float(m.p)
    name = type(m).__name__
    if any(s in name for s in _STOCHASTIC_DEPTH_NAMES):
        p = getattr(m, 'drop_prob', getattr(m, 'p', None))
        return 'dropout', None if p is None else float(p)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        # without running statistics a BN normalises with batch statistics at test time too: no shift
        return ('bn' if m.track_running_stats else 'other'), None
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return 'linear', None
    if isinstance(m, _POOL_MODULES) or name == 'SelectAdaptivePool2d':
        return 'pool', None
    return None


def _caller() -> str:
    """``Class.method`` of the first frame outside torch and this module (names a functional call)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return '?'
    return getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)


class _Tracer(TorchFunctionMode):
    """Builds the data-flow graph: hooks add module nodes, ``__torch_function__`` adds op nodes."""

    def __init__(self, names: Dict[nn.Module, str]) -> None:
        super().__init__()
        self.names = names
        self.nodes: List[_Node] = []
        self.producer: Dict[int, int] = {}
        self.alive: List[torch.Tensor] = []     # keeps traced tensors alive so their ids stay unique
        self.frames: List[Tuple[bool, List[int], Tuple[int, ...]]] = []
        self.atomic = 0
        self.paused = False

    def _add(self, kind: str, name: str, op: str, inputs: List[int], in_shape: Tuple[int, ...],
             outputs: Iterable[torch.Tensor], p: float | None = None) -> _Node:
        outs = list(outputs)
        node = _Node(len(self.nodes), kind, name, op, inputs, in_shape,
                     tuple(outs[0].shape) if outs else (), p)
        self.nodes.append(node)
        for t in outs:
            self.producer[id(t)] = node.idx
            self.alive.append(t)
        return node

    def source(self, t: torch.Tensor) -> None:
        self._add('input', 'input', 'input', [], tuple(t.shape), [t])

    def _inputs(self, args: Any) -> Tuple[List[int], Tuple[int, ...]]:
        idxs, shape = [], ()
        for t in _tensors(args):
            if id(t) in self.producer:
                if not idxs:
                    shape = tuple(t.shape)
                idxs.append(self.producer[id(t)])
        return idxs, shape

    # module hooks ------------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        kind = _module_kind(module) if self.atomic == 0 else None
        if kind is not None:
            self.atomic += 1
            inputs, shape = self._inputs(args)
            self.frames.append((True, inputs, shape))
        else:
            self.frames.append((False, [], ()))

    def post_hook(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        recorded, inputs, in_shape = self.frames.pop()
        if not recorded:
            return None
        self.atomic -= 1
        kind, p = _module_kind(module)  # type: ignore[misc]
        if not isinstance(output, torch.Tensor):
            return None
        self.paused = True
        try:
            out = output.view_as(output)  # a fresh tensor object, so identity-returning modules get their own node
        finally:
            self.paused = False
        if kind == 'pool' and not _is_global_pool(in_shape, tuple(out.shape)):
            kind = 'other'
        self._add(kind, self.names.get(module, type(module).__name__), type(module).__name__, inputs, in_shape,
                  [out], p)
        return out

    # tensor ops --------------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.paused or self.atomic:
            return result
        outs = list(_tensors(result))
        if not outs:
            return result
        inputs, in_shape = self._inputs((args, kwargs))
        if not inputs:
            return result
        p = None
        if func in _DROPOUT_FNS:
            kind, op = 'dropout', _DROPOUT_FNS[func]
            p = kwargs.get('p', args[1] if len(args) > 1 else 0.5)
            p = float(p)
            name = f'{op} @ {_caller()}'
        elif func in _LINEAR_FNS:
            kind, op, name = 'linear', getattr(func, '__name__', str(func)), getattr(func, '__name__', str(func))
        elif func in _ADD_FNS and len(inputs) >= 2:
            kind, op, name = 'add', 'add', 'add'
        elif func in _POOL_FNS and _is_global_pool(in_shape, tuple(outs[0].shape)):
            kind, op, name = 'pool', getattr(func, '__name__', str(func)), 'pool'
        elif func is F.batch_norm:
            # a functional BN outside a BN module: a hazard only if it keeps running statistics
            has_stats = kwargs.get('running_var', args[2] if len(args) > 2 else None) is not None
            kind = 'bn' if has_stats else 'other'
            op = name = f'F.batch_norm @ {_caller()}'
        else:
            kind, op = 'other', getattr(func, '__name__', str(func))
            name = op
        self._add(kind, name, op, inputs, in_shape, outs, p)
        return result


# ----------------------------------------------------------------------------------------------------------
# graph analysis
# ----------------------------------------------------------------------------------------------------------

def _consumers(nodes: List[_Node]) -> List[List[int]]:
    cons: List[List[int]] = [[] for _ in nodes]
    for n in nodes:
        for i in dict.fromkeys(n.inputs):
            cons[i].append(n.idx)
    return cons


def _reach(start: int, edges: List[List[int]]) -> Set[int]:
    seen: Set[int] = set()
    todo = deque(edges[start])
    while todo:
        i = todo.popleft()
        if i not in seen:
            seen.add(i)
            todo.extend(edges[i])
    return seen


def _walk(start: int, nodes: List[_Node], cons: List[List[int]], stop: Set[str]) -> Tuple[List[int], Dict[int, int]]:
    """BFS from ``start`` that does not go past nodes whose kind is in ``stop``. Returns (stops hit, parents)."""
    parent: Dict[int, int] = {}
    hits: List[int] = []
    todo = deque([start])
    seen = {start}
    while todo:
        i = todo.popleft()
        for j in cons[i]:
            if j in seen:
                continue
            seen.add(j)
            parent[j] = i
            if nodes[j].kind in stop:
                hits.append(j)
            else:
                todo.append(j)
    return hits, parent


def _path(start: int, end: int, parent: Dict[int, int], nodes: List[_Node]) -> str:
    chain = [end]
    while chain[-1] != start:
        chain.append(parent[chain[-1]])
    shown = [nodes[i] for i in reversed(chain[:-1]) if nodes[i].kind != 'other' or i == end]
    return ' -> '.join(f'{n.kind}:{n.name}' if n.kind in ('bn', 'linear') else n.kind for n in shown)


def _classify(d: _Node, nodes: List[_Node], cons: List[List[int]], parents: List[List[int]]) -> AuditEntry:
    ancestors = _reach(d.idx, parents)
    descendants = _reach(d.idx, cons)
    after_pool = any(nodes[a].kind == 'pool' for a in ancestors) and (
        len(d.in_shape) <= 2 or _spatial(d.in_shape) == 1)

    # hazard: a BN reached before a residual addition or a global pool
    hits, parent = _walk(d.idx, nodes, cons, stop={'bn', 'add', 'pool'})
    bn_hits = sorted(h for h in hits if nodes[h].kind == 'bn')
    hazard = bool(bn_hits)
    consumer = nodes[bn_hits[0]].name if hazard else None

    # location: what the first residual addition downstream says about this tensor
    merges, mparent = _walk(d.idx, nodes, cons, stop={'add', 'pool'})
    adds = sorted(h for h in merges if nodes[h].kind == 'add')
    pools = sorted(h for h in merges if nodes[h].kind == 'pool')
    if after_pool:
        location = HEAD_AFTER
    elif adds:
        a = nodes[adds[0]]
        depends = [i == d.idx or i in descendants for i in a.inputs]
        if len(a.inputs) >= 2 and sum(depends) == 1:
            location = BRANCH
        else:
            location = MAIN if any(nodes[x].kind == 'add' for x in ancestors) else STEM
    elif pools:
        location = HEAD_BEFORE
    else:
        location = HEAD

    if hazard:
        path = _path(d.idx, bn_hits[0], parent, nodes)
    elif adds:
        path = _path(d.idx, adds[0], mparent, nodes)
    elif pools:
        path = _path(d.idx, pools[0], mparent, nodes)
    else:
        path = '(output)'

    note = ''
    if hazard:
        verdict = HAZARD
        note = f'{consumer} normalises dropped activations (variance shift)'
    elif location in (BRANCH, HEAD_BEFORE):
        verdict = OK
    else:
        verdict = OFF
        note = {HEAD_AFTER: 'paper: drop the feature map before global pooling',
                MAIN: 'dropout on the main path, outside any residual branch',
                STEM: 'dropout in the stem'}.get(location, '')
    return AuditEntry(name=d.name, op=d.op, p=d.p, location=location, hazard=hazard, consumer=consumer,
                      path=path, verdict=verdict, note=note)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------

def load_model(spec: str | nn.Module, **kwargs: Any) -> Tuple[nn.Module, str]:
    """A model from an ``nn.Module``, a timm name (``resnet50``, ``resnet50_dropres.a1_in1k``) or
    ``local-dir:<folder>``; returns ``(model, label)``. Raises ``AuditError`` with a clear message."""
    if isinstance(spec, nn.Module):
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


def _input_shape(model: nn.Module, input_size: Sequence[int] | None, batch_size: int) -> Tuple[int, ...]:
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        input_size = cfg.get('input_size') or (getattr(model, 'in_chans', 3), 224, 224)
    return (batch_size, *[int(s) for s in input_size])


def audit(
        model: str | nn.Module,
        *,
        input_size: Sequence[int] | None = None,
        batch_size: int = 2,
        **model_kwargs: Any,
) -> AuditReport:
    """Trace ``model`` once and classify every dropout-like op (see the module docstring).

    ``input_size`` is ``(C, H, W)``; by default the model's ``pretrained_cfg['input_size']``, else
    ``(3, 224, 224)``. ``model_kwargs`` go to ``timm.create_model`` when ``model`` is a name.
    """
    module, label = load_model(model, **model_kwargs)
    if batch_size < 2:
        raise AuditError(
            f'batch_size must be >= 2 (BatchNorm needs more than one value in train mode), got {batch_size}')
    shape = _input_shape(module, input_size, batch_size)
    names = {m: (n or type(module).__name__) for n, m in module.named_modules()}
    tracer = _Tracer(names)
    handles = []
    for m in module.modules():
        handles.append(m.register_forward_pre_hook(tracer.pre_hook))
        handles.append(m.register_forward_hook(tracer.post_hook))
    flags = {m: m.training for m in module.modules()}
    buffers = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()
               if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)}
    try:
        device = next(iter(module.parameters()), torch.empty(0)).device
        x = torch.randn(shape, device=device)
        tracer.source(x)
        module.train()
        with torch.random.fork_rng(devices=[] if device.type == 'cpu' else [device]), torch.no_grad(), tracer:
            module(x)
    except Exception as e:  # noqa: BLE001 - any failure of a user model becomes one clear message
        raise AuditError(
            f'could not trace {label}: a train-mode forward pass on a random input of shape {tuple(shape)} raised '
            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}. If the model needs another input, '
            'pass input_size=(C, H, W) (CLI: --input-size C H W).') from e
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad(), contextlib.suppress(Exception):
            state = module.state_dict(keep_vars=True)
            for k, v in buffers.items():
                state[k].copy_(v)

    nodes = tracer.nodes
    cons = _consumers(nodes)
    parents = [list(dict.fromkeys(n.inputs)) for n in nodes]
    entries = [_classify(n, nodes, cons, parents) for n in nodes if n.kind == 'dropout']
    has_bn = any(n.kind == 'bn' for n in nodes)
    return AuditReport(model=label, input_shape=tuple(shape), entries=entries, has_bn=has_bn)


def format_report(report: AuditReport, *, verbose: bool = False) -> str:
    """The audit as a text table, one row per dropout-like op, with a one-line summary."""
    head = f'{report.model}: {len(report.entries)} dropout-like op(s), traced on input {tuple(report.input_shape)}'
    if not report.entries:
        return head + '\nno dropout-like op ran: nothing to audit'
    rows = [('#', 'op', 'name', 'p', 'location', 'verdict', 'why / downstream')]
    for i, e in enumerate(report.entries):
        p = '?' if e.p is None else f'{e.p:g}'
        why = e.note or e.path
        if verbose and e.note:
            why = f'{e.note}; path: {e.path}'
        verdict = e.verdict if e.active else f'{e.verdict} (p=0, inactive)'
        rows.append((str(i), e.op, e.name, p, e.location, verdict, why))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = [head]
    for r in rows:
        lines.append('  '.join(f'{v:<{w}}' for v, w in zip(r[:-1], widths, strict=True)) + '  ' + r[-1])
    hz = report.hazards
    if not report.has_bn:
        lines.append('no BatchNorm with running statistics ran: variance shift cannot occur in this model')
    ok = sum(e.verdict == OK for e in report.entries if e.active)
    off = sum(e.verdict == OFF for e in report.entries if e.active)
    lines.append(f'summary: {ok} ok, {len(hz)} hazard(s), {off} off-guideline (active ops only)')
    return '\n'.join(lines)
