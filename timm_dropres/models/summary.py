"""A readable account of where a model's dropouts sit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.nn as nn

from .layers import ResidualDropout

__all__ = ['DropoutSite', 'dropout_sites', 'describe']


@dataclass(frozen=True)
class DropoutSite:
    """One dropout module of a model: where it is and how strongly it drops.

    Attributes:
        name: qualified module name, as in ``model.named_modules()`` (e.g. ``'layer1.0.res_drop'``,
            ``'head_drop'``).
        where: its placement, the ``ResidualDropout.where`` string (e.g. ``'after_last_bn'``,
            ``'before_last_conv'``, ``'head_before_pool'``).
        p: its drop probability (0 means the module is present but inactive).
    """

    name: str
    where: str
    p: float


def dropout_sites(model: nn.Module) -> List[DropoutSite]:
    """List every ``ResidualDropout`` in ``model``, so tools and tests can check the placement programmatically.

    Args:
        model: any module; only ``ResidualDropout`` children are reported (plain ``nn.Dropout`` is not).

    Returns:
        One ``DropoutSite`` per module, in module-registration order (the head last for timm models);
        empty if the model has no dropres dropout.

    Example:
        >>> import timm, timm_dropres
        >>> sites = timm_dropres.dropout_sites(timm.create_model('resnet18_dropres', res_drop_rate=0.1))
        >>> len(sites), sites[0].name, sites[0].where, sites[-1].name
        (9, 'layer1.0.res_drop', 'after_last_bn', 'head_drop')
    """
    return [DropoutSite(n, m.where, m.p) for n, m in model.named_modules() if isinstance(m, ResidualDropout)]


def describe(model: nn.Module) -> str:
    """Describe where the model's dropouts sit, as a text table for humans (``print`` it).

    Args:
        model: any module.

    Returns:
        A header line with the model class and the number of dropout modules, then one line per
        ``ResidualDropout`` (module name, position, rate); a one-line note if there is none.

    Example:
        >>> import timm, timm_dropres
        >>> m = timm.create_model('resnet18_dropres', res_drop_rate=0.1, drop_rate=0.1)
        >>> print(timm_dropres.describe(m))  # doctest: +ELLIPSIS
        DropResNet: 9 dropout modules
        module             position          p
        layer1.0.res_drop  after_last_bn     0.1
        ...
        head_drop          head_before_pool  0.1
        >>> print(timm_dropres.describe(timm.create_model('resnet18')))
        ResNet: no dropres dropout
    """
    sites = dropout_sites(model)
    if not sites:
        return f'{type(model).__name__}: no dropres dropout'
    width = max(len(s.name) for s in sites)
    lines = [f'{type(model).__name__}: {len(sites)} dropout modules', f'{"module":<{width}}  {"position":<17} p']
    lines += [f'{s.name:<{width}}  {s.where:<17} {s.p:g}' for s in sites]
    return '\n'.join(lines)
