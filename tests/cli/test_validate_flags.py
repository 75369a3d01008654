"""``dropres-validate``: bad flags and models come back as one error line naming the flag (exit 2)."""
from __future__ import annotations

from pathlib import Path

import pytest

from timm_dropres.cli.validate import main


@pytest.mark.parametrize('argv, needle', [
    (['--model', 'resnet18_dropres', '--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['--model', 'resnet18_dropres', '--crop-pct', '-1'], '--crop-pct must be > 0, got -1.0'),
    (['--dataset', 'x'], 'no model given: set --model'),
])
def test_bad_values_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize('model, needle', [
    ('resnet18_dropres.not_a_tag', "unknown pretrained tag 'not_a_tag' for resnet18_dropres (from --model "),
    ('resnet18_dropress', "unknown model 'resnet18_dropress'"),
    ('local-dir:/nonexistent/run', 'model folder /nonexistent/run does not exist'),
])
def test_bad_models_are_one_error_line(model, needle, tmp_path: Path, capsys):
    assert main(['--model', model, '--dataset', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('dropres-validate: error: ') and needle in err and err.count('\n') == 1, err


def test_an_existing_results_file_needs_overwrite(tmp_path: Path, capsys):
    results = tmp_path / 'r.json'
    results.write_text('{}')
    assert main(['--model', 'test_resnet_dropres', '--dataset', str(tmp_path), '--results-file', str(results)]) == 2
    assert f'--results-file {results} exists; set --overwrite to replace it' in capsys.readouterr().err
    assert results.read_text() == '{}'
