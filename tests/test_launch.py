"""``python -m timm_dropres.launch SCRIPT``: timm's scripts (here a stand-in with train.py's model creation) see the
*_dropres models; without the launcher they do not. timm's real scripts are not in its pip package."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers_train import PYTHON, subprocess_env

from timm_dropres import launch

# what timm's train.py / validate.py / inference.py / benchmark.py do with --model, in a few lines
STAND_IN = textwrap.dedent('''
    import argparse, json, sys
    import timm

    def main():
        p = argparse.ArgumentParser()
        p.add_argument('--model', required=True)
        p.add_argument('--num-classes', type=int, default=None)
        p.add_argument('--drop', type=float, default=0.0)
        p.add_argument('--exit-code', type=int, default=0)
        args = p.parse_args()
        model = timm.create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop)
        print(json.dumps(dict(name=__name__, argv=sys.argv, path0=sys.path[0], model=type(model).__name__,
                              num_classes=model.num_classes, file=__file__)))
        sys.exit(args.exit_code)

    if __name__ == '__main__':
        main()
''')


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / 'timm_scripts' / 'train.py'
    path.parent.mkdir()
    path.write_text(STAND_IN)
    return path


def _run(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *argv], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def test_launcher_runs_a_timm_script_with_the_plugin_and_plain_python_does_not(script, tmp_path):
    proc = _run(['-m', 'timm_dropres.launch', str(script), '--model', 'test_resnet_dropres', '--num-classes', '3',
                 '--exit-code', '4'], tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]  # the script's own exit status comes through
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['name'] == '__main__' and out['model'] == 'DropResNet' and out['num_classes'] == 3
    assert out['argv'] == [str(script), '--model', 'test_resnet_dropres', '--num-classes', '3', '--exit-code', '4']
    assert out['path0'] == str(script.parent) and out['file'] == str(script)  # as `python train.py` sees it
    plain = _run([str(script), '--model', 'test_resnet_dropres'], tmp_path)
    assert plain.returncode != 0 and 'Unknown model (test_resnet_dropres)' in plain.stderr


def test_launcher_in_process_and_its_errors(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    with pytest.raises(SystemExit) as e:
        launch.run_script(script, ['--model', 'test_resnet_dropres', '--num-classes', '2'])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out)['num_classes'] == 2
    assert launch.main([str(script.parent / 'validate.py')]) == 2
    assert 'not in its pip package' in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='pytorch-image-models'):
        launch.run_script('missing.py')
    assert launch.main([]) == 2 and 'usage: python -m timm_dropres.launch SCRIPT' in capsys.readouterr().err
    assert launch.main(['--help']) == 0 and 'benchmark.py' in capsys.readouterr().out


def test_a_script_in_a_timm_checkout_is_told_which_timm_it_runs_with(tmp_path):
    """``python SCRIPT`` in a checkout imports the checkout's timm; the launcher uses the installed one, and says so."""
    checkout = tmp_path / 'pytorch-image-models'
    (checkout / 'timm').mkdir(parents=True)
    (checkout / 'timm' / '__init__.py').write_text("raise ImportError('the checkout timm was imported')\n")
    script = checkout / 'train.py'
    script.write_text(STAND_IN)
    proc = _run(['-m', 'timm_dropres.launch', str(script), '--model', 'test_resnet_dropres'], tmp_path)
    import timm
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'runs with the installed timm {timm.__version__}' in proc.stderr
    assert f'pip install -e {checkout}' in proc.stderr
