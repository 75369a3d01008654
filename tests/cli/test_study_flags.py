"""``dropres-ablate`` and ``dropres-transfer``: ``--config`` is read by the library; a bad one is a usage error."""
from __future__ import annotations

from pathlib import Path

import pytest

from timm_dropres.cli.ablate import main as ablate_main
from timm_dropres.cli.transfer import main as transfer_main


@pytest.mark.parametrize('main', [ablate_main, transfer_main])
def test_an_unknown_recipe_lists_the_shipped_ones(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(['--config', 'no_such_recipe', '--report-only'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'no_such_recipe' in err and 'ablation_fmnist' in err


@pytest.mark.parametrize('main', [ablate_main, transfer_main])
def test_an_invalid_specification_is_a_usage_error_naming_file_and_key(main, tmp_path: Path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('seeds: [0]\nbogus: 1\n')
    with pytest.raises(SystemExit) as e:
        main(['--config', str(bad), '--report-only', '--out-dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--config: {bad}: unknown keys ['bogus']" in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()
