"""The top-level API is the public surface, and the subpackages respect their layering (no upward imports)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Set

import pytest

import timm_dropres

PUBLIC = {
    'convert', 'dropout_args', 'residual_blocks', 'resolve_position', 'describe', 'dropout_sites', 'DropoutSite',
    'ResidualDropout', 'registered_models', 'supported_base_models', 'SKIPPED', 'SUFFIX', 'AFTER_LAST_BN',
    'BEFORE_LAST_CONV', 'AUTO', 'HEAD_BEFORE_POOL', 'RES_DROP_POSITIONS', 'DEFAULT_RES_DROP_RATE',
    'DEFAULT_HEAD_DROP_RATE', 'DEFAULT_POST_ACT_POS', '__version__',
}
#: each layer may import itself and the layers listed for it (files.py, recipes.py, checks.py and strict_yaml.py
#: are below everything)
_BASE = {'files', 'recipes', 'checks', 'strict_yaml'}
ALLOWED = {
    'models': {'models'} | _BASE,
    'hub': {'hub', 'models'} | _BASE,
    'training': {'training', 'hub', 'models'} | _BASE,
    'research': {'research', 'training', 'hub', 'models'} | _BASE,
    'cli': {'cli', 'research', 'training', 'hub', 'models'} | _BASE,
}


def test_top_level_api_is_exactly_the_public_surface():
    assert set(timm_dropres.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(timm_dropres, name) is not None, name
    assert timm_dropres.convert.__module__ == 'timm_dropres.models.convert'
    assert timm_dropres.RES_DROP_POSITIONS == ('auto', 'after_last_bn', 'before_last_conv')


def _imported_layers(path: Path, layer: str) -> Set[str]:
    """The first-level names under ``timm_dropres`` that a module imports, lazily or not (read from its AST)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or '').startswith('timm_dropres'):
                parts = node.module.split('.')
                out.add(parts[1] if len(parts) > 1 else '__init__')
            elif node.level == 1:  # same subpackage
                out.add(layer)
            elif node.level == 2:
                if node.module:
                    out.add(node.module.split('.')[0])
                else:  # from .. import name
                    out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split('.')[1] for a in node.names if a.name.startswith('timm_dropres.'))
    return out


@pytest.mark.parametrize('layer', sorted(ALLOWED))
def test_layer_imports_only_the_layers_below_it(layer):
    root = Path(timm_dropres.__file__).parent / layer
    for path in sorted(root.glob('*.py')):
        bad = _imported_layers(path, layer) - ALLOWED[layer] - {'__version__'}
        assert not bad, f'{path.relative_to(root.parent)} imports {sorted(bad)} from a layer above {layer}'
