"""A readable account of where a model's dropouts sit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.nn as nn

from .layers import ResidualDropout

__all__ = ['DropoutSite', 'dropout_sites', 'describe']


@dataclass(frozen=True)
class DropoutSite:
    """One dropout module: its qualified name, placement and rate."""

    name: str
    where: str
    p: float


def dropout_sites(model: nn.Module) -> List[DropoutSite]:
    """Every ``ResidualDropout`` in ``model``, in module-registration order (head last for timm models)."""
    return [DropoutSite(n, m.where, m.p) for n, m in model.named_modules() if isinstance(m, ResidualDropout)]


def describe(model: nn.Module) -> str:
    """A table of the model's dropouts: ``print(timm_dropres.describe(model))``."""
    sites = dropout_sites(model)
    if not sites:
        return f'{type(model).__name__}: no dropres dropout'
    width = max(len(s.name) for s in sites)
    lines = [f'{type(model).__name__}: {len(sites)} dropout modules', f'{"module":<{width}}  {"position":<17} p']
    lines += [f'{s.name:<{width}}  {s.where:<17} {s.p:g}' for s in sites]
    return '\n'.join(lines)
