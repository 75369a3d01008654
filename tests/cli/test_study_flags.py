"""``dropres-ablate`` (re-analysis only) and ``dropres-transfer`` (replaced): ``--config`` is read by the library, a
bad one is a usage error, and the replaced command says what replaced it."""
from __future__ import annotations

from pathlib import Path

import pytest

from timm_dropres.cli.ablate import main as ablate_main
from timm_dropres.cli.transfer import main as transfer_main


def test_an_unknown_recipe_lists_the_shipped_ones(capsys):
    with pytest.raises(SystemExit) as e:
        ablate_main(['--config', 'no_such_recipe', '--report-only'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'no_such_recipe' in err and 'ablation_fmnist' in err


def test_an_invalid_specification_is_a_usage_error_naming_file_and_key(tmp_path: Path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('seeds: [0]\nbogus: 1\n')
    with pytest.raises(SystemExit) as e:
        ablate_main(['--config', str(bad), '--report-only', '--out-dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--config: {bad}: unknown keys ['bogus']" in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('argv', [[], ['--config', 'study_transfer', '--threads', '1']])
def test_dropres_transfer_names_its_replacement_and_runs_nothing(argv, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert transfer_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('dropres-transfer: error: this command was replaced.')
    assert 'configs/studies/transfer.yaml' in err and 'dropres-study' in err and err.count('\n') == 1
    assert list(tmp_path.iterdir()) == []
