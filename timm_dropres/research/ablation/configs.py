"""The ablation's dropout configurations (``CONFIGS``), rate suffixes and the rates a configuration trains with."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ...models.layers import AFTER_LAST_BN, AUTO, BEFORE_LAST_CONV, check_rate

# ----------------------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------------------

BEFORE_EVERY_BN = 'before_every_bn'
AFTER_ADD = 'after_add'
HEAD_BEFORE = 'before_pool'
HEAD_AFTER = 'after_pool'


@dataclass(frozen=True)
class AblationConfig:
    """One dropout placement of the ablation: where residual dropout goes and where head dropout goes.

    Attributes:
        name: the configuration's name (a key of ``CONFIGS``, or ``'<name>@<p>'`` for a rate override).
        residual: residual dropout position: a public ``res_drop_pos`` (``'auto'``, ``'after_last_bn'``,
            ``'before_last_conv'``), one of the hook-placed hazards (``'before_every_bn'``,
            ``'after_add'``), or None for no residual dropout.
        head: head dropout position, ``'before_pool'`` or ``'after_pool'``, or None for no head dropout.
        label: a human-readable description for the report.
        rate: if set, overrides the spec's residual and head rates (set by ``get_config('<name>@<p>')``).
    """

    name: str
    residual: Optional[str]
    head: Optional[str]
    label: str
    #: overrides the spec's residual and head rates (set by ``get_config('<name>@<p>')``)
    rate: Optional[float] = None


#: Every configuration, in report order. ``residual`` is a public ``res_drop_pos`` or one of the two
#: ablation-only hazards; the head configs switch residual dropout off to isolate the head.
CONFIGS: Dict[str, AblationConfig] = {c.name: c for c in (
    AblationConfig('none', None, None, 'no dropout'),
    AblationConfig('default', AUTO, HEAD_BEFORE, "guideline: residual at 'auto' + head before pool"),
    AblationConfig('residual', AUTO, None, "residual only, at the guideline position ('auto')"),
    AblationConfig('after_last_bn', AFTER_LAST_BN, None, 'residual after the last BN (before the addition)'),
    AblationConfig('before_last_conv', BEFORE_LAST_CONV, None, 'residual before the last conv'),
    AblationConfig(BEFORE_EVERY_BN, BEFORE_EVERY_BN, None, 'hazard: dropout before every BN of the branch'),
    AblationConfig(AFTER_ADD, AFTER_ADD, None, 'hazard: dropout on the block output (after the addition)'),
    AblationConfig('head_after_pool', None, HEAD_AFTER, "head dropout after pooling (timm's drop_rate)"),
    AblationConfig('head_before_pool', None, HEAD_BEFORE, 'head dropout before pooling (paper)'),
)}


#: report order of the configurations
CONFIG_ORDER: Tuple[str, ...] = tuple(CONFIGS)


def get_config(name: str) -> AblationConfig:
    """Look up a configuration by name, with an optional ``@<p>`` rate override for rate sweeps.

    ``'<name>@<p>'`` is that configuration with both its rates set to ``p``, so one ablation can sweep the
    rate (e.g. ``default@0.1``, ``default@0.3``) next to the placements.

    Args:
        name: a key of ``CONFIGS``, optionally suffixed ``@<p>`` with ``p`` in [0, 1).

    Returns:
        The configuration; with a suffix, a copy named ``name`` with ``rate=p`` and ``, p = <p>`` appended
        to its label.

    Raises:
        ValueError: if the base name is unknown, or the rate after ``@`` is not a number in [0, 1).

    Example:
        >>> get_config('none').residual is None
        True
        >>> c = get_config('default@0.1')
        >>> c.name, c.residual, c.head, c.rate
        ('default@0.1', 'auto', 'before_pool', 0.1)
    """
    base, sep, rate = name.partition('@')
    if base not in CONFIGS:
        raise ValueError(f'unknown configuration {name!r}; valid: {list(CONFIGS)}, optionally suffixed @<rate>')
    if not sep:
        return CONFIGS[base]
    try:
        p = float(rate)
    except ValueError:
        raise ValueError(f'configuration {name!r}: the rate after @ must be a number, got {rate!r}') from None
    p = check_rate(f'rate of {name!r}', p)
    return dataclasses.replace(CONFIGS[base], name=name, rate=p, label=f'{CONFIGS[base].label}, p = {p:g}')


def config_rates(spec: Any, config: AblationConfig) -> Tuple[float, float]:
    """``(residual rate, head rate)`` of ``config`` in a study ``spec`` (ablation or transfer): the rate suffix
    (``'<name>@<p>'``) when there is one, else the spec's ``res_drop_rate`` and ``head_drop_rate``."""
    if config.rate is not None:
        return config.rate, config.rate
    return spec.res_drop_rate, spec.head_drop_rate


