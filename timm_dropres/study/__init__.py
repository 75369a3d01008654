"""Paired dropout studies on any data, through the product's trainer: spec -> runs -> records -> report."""
from .power import minimum_detectable_effect, seeds_needed
from .report import write_study_report
from .runner import StudyError, read_records, run_one, run_study
from .spec import StudySpec, load_study_spec, plan_runs

__all__ = ['StudySpec', 'load_study_spec', 'plan_runs', 'run_study', 'run_one', 'read_records', 'StudyError',
           'write_study_report', 'minimum_detectable_effect', 'seeds_needed']
