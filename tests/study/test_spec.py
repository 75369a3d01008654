"""Study specs: validated up front with errors that name the key; the shipped study specs load and plan."""
from __future__ import annotations

from pathlib import Path

import pytest
from study_helpers import study_dict

from timm_dropres.recipes import RECIPES_DIR
from timm_dropres.study.spec import load_study_spec, parse_study_spec, plan_runs, run_fingerprint


def _spec(tmp_path: Path, **over):
    return parse_study_spec(study_dict(tmp_path / 'data', tmp_path, **over))


def test_plan_seeds_outermost_and_per_config_seeds(tmp_path):
    spec = _spec(tmp_path, seeds=3, configs=dict(none={}, residual=dict(res_drop_rate=0.1),
                                                 wrong=dict(hazard='after_add', hazard_rate=0.1, seeds=1)))
    keys = [r.key for r in plan_runs(spec)]
    assert keys[:3] == ['p20/none/seed0', 'p20/residual/seed0', 'p20/wrong/seed0']
    assert len(keys) == 3 + 3 + 1 and 'p20/wrong/seed1' not in keys


def test_fingerprint_ignores_seed_and_labels_but_not_dropout(tmp_path):
    spec = _spec(tmp_path)
    a, b = plan_runs(spec)[:2]
    assert run_fingerprint(spec, a) != run_fingerprint(spec, b)
    relabelled = _spec(tmp_path, architectures=[dict(name='p20', model='preresnet20_cifar_dropres', img_size=20,
                                                     label='new words')])
    assert run_fingerprint(relabelled, plan_runs(relabelled)[0]) == run_fingerprint(spec, a)


@pytest.mark.parametrize('over, match', [
    (dict(bogus=1), r"unknown keys \['bogus'\]"),
    (dict(train=dict(seed=3)), r"\['seed'\] are set by the study per run"),
    (dict(train=dict(epoch=3)), r"unknown dropres-finetune options \['epoch'\]"),
    (dict(train=dict(epochs=0)), r'train: epochs must be >= 1, got 0'),
    (dict(configs=dict(none={}, x=dict(hazard='before_bn', hazard_rate=0.1))), r"hazard must be one of"),
    (dict(configs=dict(none={}, x=dict(hazard='after_add'))), r'hazard and hazard_rate go together'),
    (dict(configs=dict(none={}, x=dict(res_drop_rate=1.5))), r'res_drop_rate'),
    (dict(configs=dict(none={}, x=dict(timm=True, res_drop_rate=0.1))), r'plain timm model'),
    (dict(comparisons=dict(main=[['residual', 'nothing']])), r"unknown configurations \['nothing'\]"),
    (dict(seeds=0), r'seed count must be >= 1'),
    (dict(select='first'), r"select must be 'last' or 'best'"),
    (dict(data=dict(dataset='x', augment=dict(pad=2))), r'in_memory: true'),
    (dict(name='../elsewhere'), r"study name must be a plain file name .* got '../elsewhere'"),
    (dict(configs=dict(none={}, **{'a/b': dict(drop_rate=0.1)})), r"configuration name must be a plain file name"),
])
def test_bad_specs_fail_naming_the_key(tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        _spec(tmp_path, **over)


def test_a_key_given_twice_is_refused(tmp_path):
    """A second ``none:`` would silently replace the baseline (the last value wins in plain YAML)."""
    (tmp_path / 'twice.yaml').write_text('name: t\nconfigs:\n  none: {}\n  none: {drop_rate: 0.1}\n')
    with pytest.raises(ValueError, match="the key 'none' is given twice"):
        load_study_spec(tmp_path / 'twice.yaml')


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_study_spec(tmp_path / 'nope.yaml')
    (tmp_path / 'list.yaml').write_text('- 1\n')
    with pytest.raises(ValueError, match='expected a mapping'):
        load_study_spec(tmp_path / 'list.yaml')


STUDIES = sorted((RECIPES_DIR / 'studies').glob('*.yaml'))


def test_the_three_studies_are_shipped():
    assert {p.stem for p in STUDIES} >= {'overfit', 'transfer', 'underfit'}


@pytest.mark.parametrize('path', STUDIES, ids=lambda p: p.stem)
def test_shipped_study_specs_load_and_follow_the_seed_calculation(path):
    spec = load_study_spec(path)
    runs = plan_runs(spec)
    assert runs and spec.comparisons
    assert spec.resolved_out_dir() == Path('docs/results') / path.stem  # records are committed there
    assert spec.name == f'{path.stem}_engine'  # its report sits beside the first run's <stem>.md, never over it
    main = [c for c in spec.configs if c.seeds is None]
    wrong = [c for c in spec.configs if c.seeds is not None]
    assert 12 <= len(spec.seeds) <= 20, 'main comparisons: 12-20 seeds from the power calculation'
    assert all(len(c.seeds) == 5 for c in wrong), 'wrong placements stay at 5 seeds'
    assert {'none'} <= {c.name for c in main}


def test_readme_study_example_is_a_valid_spec_and_its_calculator_line_runs(capsys):
    import yaml
    from hub_helpers import code_blocks

    from timm_dropres.cli.study import main

    readme = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    block = next(b for b in code_blocks(readme, 'yaml') if 'name: flowers' in b)
    spec = parse_study_spec(yaml.safe_load(block))
    assert len(plan_runs(spec)) == 12 * 4 and spec.config('timm').timm
    line = next(b for b in code_blocks(readme, 'bash') if '--seeds-for-sd' in b and 'my_study.yaml' in b)
    args = next(x for x in line.splitlines() if '--seeds-for-sd' in x).split('#')[0].split()[1:]
    assert main(args) == 0
    assert 'seeds resolve 0.5' in capsys.readouterr().out
