"""The traced data-flow graph and the rules that give every dropout its location and verdict."""
from __future__ import annotations

from collections import deque
from typing import Callable, Dict, List, Set, Tuple

from .tracer import _multi_position, _Node
from .vocabulary import BODY, BRANCH, HEAD, HEAD_1X1, HEAD_AFTER, HEAD_BEFORE, MAIN, SHORTCUT, STEM, UNUSED, AuditEntry

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


def _bn_merges(g: _Graph) -> int:
    """Residual merges whose branch operand is computed from a BN that is itself computed from the fork."""
    bns = [n.idx for n in g.nodes if n.kind == 'bn']
    count = 0
    for branch, skip in g.merges.values():
        common = (g.anc[branch] | (1 << branch)) & (g.anc[skip] | (1 << skip))
        fork = common.bit_length() - 1
        count += any(b > fork and g.is_ancestor(fork, b) and g.is_ancestor(b, branch) for b in bns)
    return count
