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
(:data:`VERDICTS`). Both vocabularies are defined once, in ``vocabulary``; ``docs/placement.md`` states the
same rules and a test keeps the two in sync.

Modules: ``vocabulary`` (locations, verdicts, terms, the result types), ``tracer`` (the execution trace),
``rules`` (the data-flow graph and the classification), ``engine`` (``load_model``, ``audit``) and ``report``
(the text table, ``describe_rules``); this package re-exports their public names.
"""
from __future__ import annotations

from .engine import audit, load_model
from .report import describe_rules, format_p, format_report
from .vocabulary import (
    BODY,
    BRANCH,
    GUIDELINE_LOCATIONS,
    HAZARD,
    HEAD,
    HEAD_1X1,
    HEAD_AFTER,
    HEAD_BEFORE,
    LOCATIONS,
    MAIN,
    OFF,
    OK,
    SHORTCUT,
    STEM,
    TABLE_COLUMNS,
    TERMS,
    UNUSED,
    VERDICTS,
    AuditEntry,
    AuditError,
    AuditReport,
)

__all__ = [
    'AuditError', 'AuditEntry', 'AuditReport', 'audit', 'load_model', 'format_report', 'describe_rules', 'format_p',
    'VERDICTS', 'LOCATIONS', 'TERMS', 'GUIDELINE_LOCATIONS', 'TABLE_COLUMNS', 'OK', 'OFF', 'HAZARD', 'STEM',
    'BRANCH', 'SHORTCUT', 'MAIN', 'BODY', 'UNUSED', 'HEAD_BEFORE', 'HEAD_AFTER', 'HEAD_1X1', 'HEAD'
]
