"""``dropres-analyze``: bad values and models reach the library, whose message comes back in one line (exit 2)."""
from __future__ import annotations

import pytest

from timm_dropres.cli.analyze import main


@pytest.mark.parametrize('argv, needle', [
    (['block', '--p', '1.5'], 'p must be in [0, 1), got 1.5'),
    (['shift', '--model', 'alice/resnet'], "Use 'hf-hub:alice/resnet' to load from the Hub"),
    (['shift', '--model', 'local-dir:/nonexistent/run'], 'model folder /nonexistent/run does not exist'),
])
def test_bad_values_are_one_error_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('dropres-analyze: error: ') and needle in err and err.count('\n') == 1, err


def test_a_bad_choice_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(['shift', '--model', 'resnet18_dropres', '--data', 'imagenet'])
    assert e.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err
