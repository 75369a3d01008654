"""Dropout-placement ablation on real data: train one architecture per placement, N seeds each, and compare.

Configurations (``CONFIGS``): no dropout, the dropres default, each residual position the public API offers,
two hazards that exist only here (dropout before every BN of the branch; dropout on the block output, after
the residual addition), and head dropout after vs before global pooling. The hazards are placed with hooks
(``place_before_every_bn``, ``place_after_add``, ``place_head_after_pool``) so they never enter the public
``res_drop_pos`` vocabulary.

One run = build (``timm.create_model``) -> train (timm's ``create_optimizer_v2``/``create_scheduler_v2``)
-> top-1 and NLL on the test set -> eval-mode variance shift of every BN (``analysis.variance_shift``). Each
finished run writes a small JSON; ``run_ablation`` skips runs whose JSON exists, so an interrupted
ablation resumes where it stopped. ``summarize`` and ``write_report`` turn the records into mean ± std
tables, a CSV and a PNG, with differences inside the seed spread marked not significant (``compare``).

Data are in-memory tensors, not the trainer's PIL DataLoader: at 28x28 on 2 CPU cores the per-image PIL
pipeline would cost more than the network, and the ablation needs dozens of runs.

Modules: ``configs`` (the configurations), ``placement`` (hook-placed hazards, ``build_model``), ``spec`` (the
YAML), ``data`` and ``runner`` (one run, the resumable loop, the records; the training loop lives only there).
The report is :mod:`timm_dropres.research.report`. This package re-exports the public names.
"""
from __future__ import annotations

from .configs import CONFIG_ORDER, CONFIGS, AblationConfig, config_rates, get_config
from .data import AblationData, load_fmnist_data, per_class_subset, select_classes
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
from .runner import read_records, run_ablation, run_one
from .spec import AblationSpec, ArchSpec, DataSpec, Schedule, dataclass_from_mapping, load_spec, read_spec_mapping

__all__ = [
    'AblationConfig', 'CONFIGS', 'get_config', 'AblationDropout', 'place_before_every_bn', 'place_after_add',
    'place_head_after_pool', 'small_input_stem', 'ArchSpec', 'Schedule', 'DataSpec', 'AblationSpec', 'load_spec',
    'AblationData', 'load_fmnist_data', 'build_model', 'configs_for', 'run_one', 'run_ablation', 'read_records',
    'select_classes', 'per_class_subset', 'CONFIG_ORDER', 'config_rates', 'resolved_position',
    'dataclass_from_mapping', 'read_spec_mapping'
]
