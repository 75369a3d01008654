"""The top-level API is the public surface, and the package keeps its structure.

The structure rules (issue 18), each checked from the source so that it stays true:

* layering: each subpackage imports only from the ones below it (``training`` nothing from ``hub``);
* no import cycle between modules, counting imports under ``TYPE_CHECKING`` and inside functions;
* no module over :data:`MAX_LINES` lines;
* model strings are parsed in one place: the bare ``'local-dir:'`` literal (used to slice, compare or build
  names; help and error texts do not count) appears in at most :data:`MAX_LOCAL_DIR_MODULES` modules;
* every public function and method of ``training`` and ``hub`` has a Google-style docstring with ``Args:``
  (when it takes arguments) and ``Returns:`` (when it returns a value).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

import timm_dropres

PUBLIC = {
    'convert', 'dropout_args', 'residual_blocks', 'resolve_position', 'describe', 'dropout_sites', 'DropoutSite',
    'ResidualDropout', 'registered_models', 'supported_base_models', 'SKIPPED', 'SUFFIX', 'AFTER_LAST_BN',
    'BEFORE_LAST_CONV', 'AUTO', 'HEAD_BEFORE_POOL', 'RES_DROP_POSITIONS', 'DEFAULT_RES_DROP_RATE',
    'DEFAULT_HEAD_DROP_RATE', 'DEFAULT_POST_ACT_POS', '__version__',
}
#: each layer may import itself and the layers listed for it (files.py, errors.py, recipes.py, checks.py and
#: strict_yaml.py are below everything)
_BASE = {'files', 'errors', 'recipes', 'checks', 'strict_yaml'}
ALLOWED = {
    'models': {'models'} | _BASE,
    'training': {'training', 'models'} | _BASE,
    'hub': {'hub', 'models'} | _BASE,
    'research': {'research', 'training', 'hub', 'models'} | _BASE,
    'study': {'study', 'research', 'training', 'hub', 'models'} | _BASE,
    'cli': {'cli', 'study', 'research', 'training', 'hub', 'models'} | _BASE,
}
ROOT = Path(timm_dropres.__file__).parent
MAX_LINES = 600
MAX_LOCAL_DIR_MODULES = 2


def test_top_level_api_is_exactly_the_public_surface():
    assert set(timm_dropres.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(timm_dropres, name) is not None, name
    assert timm_dropres.convert.__module__ == 'timm_dropres.models.convert'
    assert timm_dropres.RES_DROP_POSITIONS == ('auto', 'after_last_bn', 'before_last_conv')


def _module_name(path: Path, root: Path = ROOT) -> str:
    """``timm_dropres.training.data.dataset`` for ``timm_dropres/training/data/dataset.py`` (packages: ``__init__``)."""
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules(root: Path = ROOT) -> Dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob('*.py'))}


def _imports(path: Path, modules: Dict[str, Path], root: Path = ROOT) -> Iterator[str]:
    """Every module of the package that ``path`` imports, anywhere in it (module level, functions,
    ``TYPE_CHECKING`` blocks); ``from package import name`` counts as importing ``package.name`` when that is
    a module."""
    name = _module_name(path, root)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split('.')[0] == root.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.split('.')[0] != root.name:
                continue
            subs = [f'{target}.{a.name}' for a in node.names if f'{target}.{a.name}' in modules]
            yield from subs if len(subs) == len(node.names) else [target, *subs]


def _import_cycle(root: Path) -> List[str]:
    """One import cycle among the modules under ``root`` (as a path ``a -> b -> a``), or ``[]``."""
    modules = _modules(root)
    graph = {m: sorted({t for t in _imports(p, modules, root) if t in modules and t != m}) for m, p in modules.items()}
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return []

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT.parent)): len(p.read_text().splitlines()) for p in ROOT.rglob('*.py')}
    big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not big, f'modules over {MAX_LINES} lines (split them by concern): {big}'


def test_no_import_cycle_counting_type_checking_and_function_level_imports():
    cycle = _import_cycle(ROOT)
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


def test_the_cycle_check_sees_type_checking_and_lazy_imports(tmp_path):
    """The rule above would miss what it exists for if it skipped ``TYPE_CHECKING`` blocks or functions."""
    pkg = tmp_path / 'pkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'config.py').write_text('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .build import B\n')
    (pkg / 'build.py').write_text('def f():\n    from . import config\n')
    assert _import_cycle(pkg) in (['pkg.config', 'pkg.build', 'pkg.config'], ['pkg.build', 'pkg.config', 'pkg.build'])
    (pkg / 'build.py').write_text('import os\n')
    assert _import_cycle(pkg) == []


def _bare_local_dir_literals(path: Path) -> List[int]:
    """Lines where ``'local-dir:'`` is a bare literal: the whole string (a prefix to compare, slice or
    join), or the part of an f-string right before a value (a name being built). Text that merely mentions
    ``local-dir:<folder>`` (help, docstrings, messages) is not a bare literal."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value in ('local-dir:', 'local-dir'):
            lines.append(node.lineno)
        elif isinstance(node, ast.JoinedStr):
            for part, nxt in zip(node.values, node.values[1:], strict=False):
                if (isinstance(part, ast.Constant) and str(part.value).endswith('local-dir:')
                        and isinstance(nxt, ast.FormattedValue)):
                    lines.append(node.lineno)
    return lines


def test_model_strings_are_parsed_in_one_place():
    found = {str(p.relative_to(ROOT.parent)): lines for p in sorted(ROOT.rglob('*.py'))
             if (lines := _bare_local_dir_literals(p))}
    assert 'timm_dropres/models/reference.py' in found  # the model reference owns the prefix
    assert len(found) <= MAX_LOCAL_DIR_MODULES, f"'local-dir:' sliced or built outside ModelRef: {found}"


def _returns_value(fn: ast.AST) -> bool:
    own = [n for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None
           and not (isinstance(n.value, ast.Constant) and n.value.value is None)]
    nested = {id(r) for f in ast.walk(fn) if f is not fn and isinstance(f, (ast.FunctionDef, ast.Lambda))
              for r in ast.walk(f)}
    return any(id(r) not in nested for r in own)


def _public_functions(path: Path) -> Iterator[ast.FunctionDef]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith('_'):
            yield node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
            for m in node.body:
                if (isinstance(m, ast.FunctionDef) and not m.name.startswith('_')
                        and not any(isinstance(d, ast.Name) and d.id == 'property' for d in m.decorator_list)):
                    yield m


@pytest.mark.parametrize('layer', ['training', 'hub'])
def test_public_functions_have_google_docstrings(layer):
    missing = []
    for path in sorted((ROOT / layer).rglob('*.py')):
        for fn in _public_functions(path):
            doc = ast.get_docstring(fn) or ''
            args = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
                    if a.arg not in ('self', 'cls')] + [a.arg for a in (fn.args.vararg, fn.args.kwarg) if a]
            where = f'{path.relative_to(ROOT.parent)}:{fn.lineno} {fn.name}'
            if not doc:
                missing.append(f'{where}: no docstring')
            if doc and args and 'Args:' not in doc:
                missing.append(f'{where}: no Args:')
            if doc and _returns_value(fn) and 'Returns:' not in doc:
                missing.append(f'{where}: no Returns:')
    assert not missing, '\n'.join(missing)


def _imported_layers(path: Path, layer: str) -> Set[str]:
    """The first-level names under ``timm_dropres`` that a module imports, lazily or not (read from its AST)."""
    return {m.split('.')[1] if '.' in m else '__init__' for m in _imports(path, _modules())}


@pytest.mark.parametrize('layer', sorted(ALLOWED))
def test_layer_imports_only_the_layers_below_it(layer):
    root = ROOT / layer
    for path in sorted(root.rglob('*.py')):
        bad = _imported_layers(path, layer) - ALLOWED[layer] - {'__version__', '__init__'}
        assert not bad, f'{path.relative_to(root.parent)} imports {sorted(bad)} from a layer above {layer}'


def test_training_imports_nothing_from_hub():
    users = [str(p.relative_to(ROOT.parent)) for p in sorted((ROOT / 'training').rglob('*.py'))
             if 'hub' in _imported_layers(p, 'training')]
    assert not users, f'training/ must not import hub/ (the HF folder format lives in models/): {users}'


#: the one module that may run a backward pass: the product's trainer (issue 19: one training loop)
TRAINER = 'timm_dropres/training/trainer.py'


def _backward_calls(path: Path) -> List[int]:
    """Lines calling ``<anything>.backward(...)`` (``loss.backward()``, ``accelerator.backward(loss)``,
    ``torch.autograd.backward(...)``), a bare ``backward(...)``, or ``torch.autograd.grad(...)``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name == 'backward' or (name == 'grad' and isinstance(f, ast.Attribute)
                                  and ast.unparse(f.value).endswith('autograd')):
            lines.append(node.lineno)
    return lines


def test_only_the_trainer_runs_a_backward_pass():
    found = {str(p.relative_to(ROOT.parent)): lines for p in sorted(ROOT.rglob('*.py'))
             if (lines := _backward_calls(p))}
    assert TRAINER in found, 'the trainer\'s backward call is no longer seen: the check would find nothing'
    del found[TRAINER]
    assert not found, f'training loops outside the trainer ({TRAINER}); train through it instead: {found}'


def test_the_backward_check_sees_every_spelling(tmp_path):
    src = tmp_path / 'm.py'
    src.write_text('import torch\nfrom torch.autograd import backward\n\n\ndef f(loss, acc, x):\n'
                   '    loss.backward()\n    acc.backward(loss)\n    torch.autograd.backward([loss])\n'
                   '    backward(loss)\n    torch.autograd.grad(loss, x)\n'
                   '    x.grad = None\n    hook = "backward"\n    x.register_full_backward_hook(f)\n')
    assert _backward_calls(src) == [6, 7, 8, 9, 10]
