"""Dropout-placement ablation on real data: the placements, their specification, and the first study's records.

Configurations (``CONFIGS``): no dropout, ``default`` (the guideline: residual and head dropout together; the
name predates the package defaults of 0), each residual position the public API offers,
two hazards that exist only here (dropout before every BN of the branch; dropout on the block output, after
the residual addition), and head dropout after vs before global pooling. The hazards are placed with hooks
(``place_before_every_bn``, ``place_after_add``, ``place_head_after_pool``) so they never enter the public
``res_drop_pos`` vocabulary.

Studies train through the product's trainer only: :mod:`timm_dropres.study` (``dropres-study``) places the
hazards with the hooks of ``placement``. The first ablation's private training loop is gone from the package
(issue 19; a copy for the engine-vs-harness benchmark lives in ``benchmarks/ablation_harness.py``); its
committed run records are read by ``records.read_records`` and re-analysed by ``dropres-ablate --report-only``
into the tables of :mod:`timm_dropres.research.report`.

Modules: ``configs`` (the configurations), ``placement`` (hook-placed hazards, ``build_model``), ``spec`` (the
first ablation's YAML), ``records`` (its run records). This package re-exports the public names.
"""
from __future__ import annotations

from .configs import CONFIG_ORDER, CONFIGS, AblationConfig, config_rates, get_config
from .placement import (
    AblationDropout,
    build_model,
    configs_for,
    place_after_add,
    place_before_every_bn,
    place_head_after_pool,
    resolved_position,
    small_input_stem,
)
from .records import read_records
from .spec import AblationSpec, ArchSpec, DataSpec, Schedule, dataclass_from_mapping, load_spec, read_spec_mapping

__all__ = [
    'AblationConfig', 'CONFIGS', 'get_config', 'AblationDropout', 'place_before_every_bn', 'place_after_add',
    'place_head_after_pool', 'small_input_stem', 'ArchSpec', 'Schedule', 'DataSpec', 'AblationSpec', 'load_spec',
    'build_model', 'configs_for', 'read_records', 'CONFIG_ORDER', 'config_rates', 'resolved_position',
    'dataclass_from_mapping', 'read_spec_mapping'
]
