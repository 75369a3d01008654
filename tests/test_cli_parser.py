"""One-line argparse errors with the closest flag (cli/_parser.py), and --list-configs naming each recipe's command."""
from __future__ import annotations

import pytest

from timm_dropres.cli._config_args import load_yaml, recipe_command
from timm_dropres.cli.audit import main as audit_main
from timm_dropres.cli.finetune import main as finetune_main
from timm_dropres.recipes import find_recipe, list_recipes
from timm_dropres.training.config import FinetuneConfig


def test_a_mistyped_flag_gets_one_line_and_the_closest_flags(capsys):
    with pytest.raises(SystemExit) as e:
        finetune_main(['--modle', 'resnet18_dropres'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'usage:' not in err, err
    assert err == ('dropres-finetune: error: unrecognized arguments: --modle resnet18_dropres (--modle: did you mean '
                   '--model or --model-ema?); dropres-finetune --help lists every option\n')
    with pytest.raises(SystemExit):
        audit_main(['resnet18', '--strikt'])
    assert '--strikt: did you mean --strict?' in capsys.readouterr().err


def test_list_configs_says_which_command_takes_each_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        finetune_main(['--list-configs'])
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()}
    assert e.value.code == 0 and set(rows) == set(list_recipes())
    assert rows['accelerate/multi_gpu'] == ['accelerate', 'launch']
    assert rows['fashion_mnist_resnet18'] == rows['paper/preresnet110_cifar10'] == ['dropres-finetune', '--config']
    assert recipe_command('ablation_fmnist') == 'dropres-ablate --report-only --config'
    assert recipe_command('study_overfit') == 'dropres-ablate --report-only --config'
    assert recipe_command('studies/transfer') == rows['studies/overfit'][0] == 'dropres-study'
    for name in list_recipes():  # every recipe listed for dropres-finetune really parses as one
        if recipe_command(name) == 'dropres-finetune --config':
            assert load_yaml(find_recipe(name), FinetuneConfig)


def test_a_recipe_of_another_command_says_which_command_takes_it(capsys):
    with pytest.raises(SystemExit) as e:
        finetune_main(['--config', 'ablation_fmnist'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown option 'seeds'" in err, err
    assert '(ablation_fmnist is a recipe for dropres-ablate --report-only --config)' in err, err


def test_audit_kwarg_yaml_errors_are_one_line(capsys):
    for value, said in (('a={x: 1, x: 2}', "the key 'x' is given twice"), ('a=[1, 2', 'VALUE is not valid YAML')):
        with pytest.raises(SystemExit) as e:
            audit_main(['test_resnet', '--kwarg', value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and err.count('\n') == 1 and 'Traceback' not in err, err
