"""The placement rule, stated once for ``convert()`` and for the audit (``timm_dropres.research.audit``).

The audit decides, from an execution trace, where a dropout sits (a *location*) and whether a BatchNorm reads
its output (a *hazard*); ``verdict`` turns the two into ``ok`` / ``off-guideline`` / ``hazard``. ``convert()``
places every ``ResidualDropout`` at a point it names by ``ResidualDropout.where``; ``SITE_LOCATIONS`` says which
audit location each of those names must get. A test audits the ``*_dropres`` variants in train mode and checks
every site against this table, so the converter and the audit read one rule and cannot disagree silently.
"""
from __future__ import annotations

from typing import Dict, Final, Tuple

from .layers import AFTER_LAST_BN, BEFORE_LAST_CONV, HEAD_BEFORE_POOL

__all__ = ['OK', 'OFF', 'HAZARD', 'BRANCH', 'HEAD_BEFORE', 'HEAD_1X1', 'GUIDELINE_LOCATIONS', 'SITE_LOCATIONS',
           'verdict']

OK: Final[str] = 'ok'
OFF: Final[str] = 'off-guideline'
HAZARD: Final[str] = 'hazard'

BRANCH: Final[str] = 'residual branch'
HEAD_BEFORE: Final[str] = 'head, before pooling'
HEAD_1X1: Final[str] = 'head, 1x1 map'

#: Locations where a dropout that no BatchNorm reads is at a guideline position (``ok``).
GUIDELINE_LOCATIONS: Final[Tuple[str, ...]] = (BRANCH, HEAD_BEFORE, HEAD_1X1)

#: ``ResidualDropout.where`` -> the audit locations a dropout placed there must get. ``convert()`` never places
#: a dropout anywhere else. Every location listed is a guideline location; ``before_last_conv`` in a
#: post-activation block is still a hazard (its last BN reads the dropped values), which the audit reports.
SITE_LOCATIONS: Final[Dict[str, Tuple[str, ...]]] = {
    AFTER_LAST_BN: (BRANCH,),
    BEFORE_LAST_CONV: (BRANCH,),
    HEAD_BEFORE_POOL: (HEAD_BEFORE, HEAD_1X1),
}


def verdict(location: str, hazard: bool) -> str:
    """The verdict for a dropout at ``location``.

    Args:
        location: the audit's location label.
        hazard: whether a BatchNorm with running statistics reads the dropped activations before a residual
            merge or a global pool.

    Returns:
        ``'hazard'`` if ``hazard``, else ``'ok'`` at a guideline location and ``'off-guideline'`` elsewhere.

    Example:
        >>> verdict('residual branch', False), verdict('main path', False), verdict('residual branch', True)
        ('ok', 'off-guideline', 'hazard')
    """
    if hazard:
        return HAZARD
    return OK if location in GUIDELINE_LOCATIONS else OFF
