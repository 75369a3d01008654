"""``dropres-finetune``: each bad flag reaches the library, comes back as one usage error naming the flag, and
nothing is written."""
from __future__ import annotations

from pathlib import Path

import pytest

from timm_dropres.cli.finetune import main


@pytest.mark.parametrize('argv, needle', [
    (['--lr', 'nan'], '--lr must be a finite number, got nan'),
    (['--weight-decay', '-1'], '--weight-decay must be >= 0, got -1.0'),
    (['--sched', 'multistep'], '--sched multistep needs --decay-milestones'),
    (['--decay-milestones', '5', '--epochs', '3'], '--decay-milestones must be increasing epochs in (0, --epochs=3)'),
    (['--res-drop-rate', '1.5'], 'res_drop_rate must be in [0, 1), got 1.5'),  # the layer's own check
    (['--model-kwargs', 'num_classes=3'], "--model-kwargs ['num_classes'] are set by the trainer"),
    (['--drop-rate', '0.1', '--model-kwargs', 'drop_rate=0.2'], "--model-kwargs ['drop_rate']"),
    (['--torchcompile', '--grad-checkpointing'], '--torchcompile and --grad-checkpointing together fail'),
    (['--torchcompile', 'nosuchbackend'], "--torchcompile 'nosuchbackend' is not a torch.compile backend"),
    (['--initial-checkpoint', 'missing.safetensors'], '--initial-checkpoint missing.safetensors does not exist'),
    (['--pretrained-file', 'missing.safetensors'], '--pretrained-file missing.safetensors does not exist'),
    (['--model', 'resnet18', '--res-drop-rate', '0.1'], '--res-drop-rate need a *_dropres model, but '
                                                         "'resnet18' is not one; use --model resnet18_dropres"),
    (['--model', 'resnet18_dropress'], "unknown model 'resnet18_dropress'; did you mean"),
    (['--model', 'resnet18_dropres.not_a_tag'], "unknown pretrained tag 'not_a_tag' for resnet18_dropres (from "
                                                '--model resnet18_dropres.not_a_tag)'),
    (['--model', 'local-dir:/nonexistent/run'], 'model folder /nonexistent/run does not exist'),
    (['--model', 'alice/resnet'], "Use 'hf-hub:alice/resnet' to load from the Hub"),  # timm's own parser
])
def test_bad_flags_are_usage_errors_naming_the_flag(argv, needle, tmp_path: Path, capsys):
    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        main(['--dataset', str(tmp_path), '--output-dir', str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err, err
    assert err.count('error:') == 1 and 'Traceback' not in err
    assert not out.exists()


def test_errors_found_while_running_name_flags_too(tmp_path: Path, capsys):
    """A dataset problem is found after parsing: one error line, exit 2, nothing written."""
    out = tmp_path / 'run'
    rc = main(['--model', 'test_resnet_dropres', '--dataset', str(tmp_path / 'missing'), '--output-dir', str(out),
               '--cpu'])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith('dropres-finetune: error: ') and 'does not exist' in err
    assert not out.exists()
