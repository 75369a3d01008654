"""The CLIs' side of validation: library errors name options by field, the CLIs render them as flags."""
from __future__ import annotations

import pytest

from timm_dropres.cli._config_args import flag_message, parse_checked
from timm_dropres.errors import OptionError
from timm_dropres.training.build import resolve_model
from timm_dropres.training.config import FinetuneConfig


def test_an_option_error_is_rendered_with_flag_names():
    e = OptionError('{0} must be increasing epochs in (0, {1}={epochs}), got {value}', 'decay_milestones', 'epochs',
                    epochs=3, value=[5])
    assert str(e) == 'decay_milestones must be increasing epochs in (0, epochs=3), got [5]'  # library terms
    assert flag_message(e) == '--decay-milestones must be increasing epochs in (0, --epochs=3), got [5]'


def test_values_and_plain_messages_keep_their_braces():
    e = OptionError('{0} {overlap} clash', 'model_kwargs', overlap={'a': 1})
    assert flag_message(e) == "--model-kwargs {'a': 1} clash"
    assert flag_message(OptionError("config.json model_args {'x': 1} do not build")) == (
        "config.json model_args {'x': 1} do not build")
    assert flag_message(ValueError('other errors pass through')) == 'other errors pass through'


def test_a_failed_boundary_check_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_checked(FinetuneConfig, ['--model', 'resnet18', '--res-drop-pos', 'auto'], 'test', 'dropres-finetune',
                      resolve_model)
    err = capsys.readouterr().err
    # a usage error, in one line since issue 20 (cli/_parser.py): '<prog>: error: ...', pointing to --help
    assert e.value.code == 2 and err.startswith('dropres-finetune: error: ') and err.count('\n') == 1
    assert '--res-drop-pos need a *_dropres model' in err and 'use --model resnet18_dropres' in err


def test_the_boundary_check_runs_once_and_its_result_is_returned():
    calls = []

    def check(cfg: FinetuneConfig) -> str:
        calls.append(cfg.model)
        return 'checked'

    cfg, out = parse_checked(FinetuneConfig, ['--model', 'test_resnet_dropres'], 'test', 'x', check)
    assert (cfg.model, out, calls) == ('test_resnet_dropres', 'checked', ['test_resnet_dropres'])


def test_the_config_itself_does_no_io_and_names_fields():
    # a folder that does not exist and an unknown backend are not the config's business: resolve_model's
    cfg = FinetuneConfig(model='local-dir:/nonexistent', torchcompile='nosuchbackend')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        resolve_model(cfg)
    with pytest.raises(OptionError, match=r'^lr must be > 0, got 0.0$'):
        FinetuneConfig(lr=0.0)
