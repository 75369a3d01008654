"""The audit's vocabulary (verdicts, locations, terms) and its result types, defined once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from ...models.placement import BRANCH, GUIDELINE_LOCATIONS, HAZARD, HEAD_1X1, HEAD_BEFORE, OFF, OK  # noqa: F401 (re-exported)
from ...models.placement import verdict as _verdict

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


