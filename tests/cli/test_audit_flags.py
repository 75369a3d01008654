"""``dropres-audit``: the model argument and the dropout flags reach ``audit``; its errors are one line (exit 2)."""
from __future__ import annotations

import pytest

from timm_dropres.cli.audit import main


@pytest.mark.parametrize('argv, needle', [
    (['local-dir:/nonexistent/run'], 'model folder /nonexistent/run does not exist'),
    (['alice/resnet'], "Use 'hf-hub:alice/resnet' to load from the Hub"),
    (['resnet_does_not_exist'], "unknown model 'resnet_does_not_exist'"),
    (['resnet18', '--res-drop-rate', '0.1'], "could not build 'resnet18'"),  # a flag the model does not take
])
def test_bad_models_and_flags_are_one_error_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('dropres-audit: error: ') and needle in err and 'Traceback' not in err, err


def test_flags_reach_the_model(capsys):
    assert main(['test_resnet_dropres', '--res-drop-rate', '0.1', '--drop-rate', '0.2', '--input-size', '3', '32',
                 '32']) == 0
    out = capsys.readouterr().out
    assert '0.1' in out and '0.2' in out
