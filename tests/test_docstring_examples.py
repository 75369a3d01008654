"""Every ``Example:`` in the package's docstrings runs and prints what it says (doctest, offline, CPU)."""
from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import timm_dropres

MODULES = sorted(m.name for m in pkgutil.walk_packages(timm_dropres.__path__, 'timm_dropres.')
                 if not m.name.endswith('triton_dropout'))  # Triton kernels: tested in tests/models
WITH_EXAMPLES = [m for m in MODULES if '>>> ' in (importlib.util.find_spec(m).loader.get_source(m) or '')]


def test_examples_are_found():
    assert {'timm_dropres.models.convert', 'timm_dropres.models.summary', 'timm_dropres.study.power'} <= set(
        WITH_EXAMPLES)


@pytest.mark.parametrize('name', WITH_EXAMPLES)
def test_docstring_examples(name, one_torch_thread):
    result = doctest.testmod(importlib.import_module(name), report=False, verbose=False,
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f'{name}: {result.failed} of {result.attempted} examples failed (run doctest -v)'
