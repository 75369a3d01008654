"""What ``pip install timm-dropres`` gives: the sdist and wheel built as a release would be, the wheel installed
into a fresh venv, and its console scripts run from a folder that has no checkout (no configs/ there)."""
from __future__ import annotations

import json
import shutil
import site
import subprocess
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Dict

import pytest
import yaml
from helpers_train import PYTHON, REPO, make_image_folder, subprocess_env

from timm_dropres.recipes import list_recipes

pytestmark = pytest.mark.slow  # a build, a venv, and three fresh interpreters that import torch

RELEASE_FILES = ('pyproject.toml', 'setup.cfg', 'README.md', 'LICENSE')


@pytest.fixture(scope='module')
def dist(tmp_path_factory) -> Dict[str, Path]:
    """sdist + wheel, built from a copy of the release files (the checkout gets no build/ or egg-info)."""
    root = tmp_path_factory.mktemp('pkg')
    src = root / 'src'
    src.mkdir()
    for name in RELEASE_FILES:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / 'timm_dropres', src / 'timm_dropres', ignore=shutil.ignore_patterns('__pycache__'))
    # build's default: the sdist first, then the wheel built from the unpacked sdist, as a release is
    proc = subprocess.run([PYTHON, '-m', 'build', '--no-isolation', '--outdir', str(root / 'dist'), str(src)],
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return dict(root=root, wheel=next((root / 'dist').glob('*.whl')), sdist=next((root / 'dist').glob('*.tar.gz')))


def test_wheel_and_sdist_carry_recipes_registry_and_license(dist):
    recipes = {f'timm_dropres/configs/{name}.yaml' for name in list_recipes()}
    assert len(recipes) >= 10
    with zipfile.ZipFile(dist['wheel']) as whl:
        names = set(whl.namelist())
        meta = whl.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
        entry_points = whl.read(next(n for n in names if n.endswith('.dist-info/entry_points.txt'))).decode()
    assert recipes <= names and 'timm_dropres/models/published.json' in names
    assert 'timm_dropres/models/csrc/dropout_cpu.cpp' in names  # compiled on first use by the installed package
    assert any(n.endswith('.dist-info/licenses/LICENSE') for n in names)
    assert 'License-Expression: Apache-2.0' in meta and 'License-File: LICENSE' in meta
    assert 'dropres-timm = timm_dropres.launch:main' in entry_points
    with tarfile.open(dist['sdist']) as sdist:
        top = sdist.getnames()[0].split('/')[0]
        snames = {n.removeprefix(f'{top}/') for n in sdist.getnames()}
    assert recipes <= snames and 'LICENSE' in snames and 'timm_dropres/models/csrc/dropout_cpu.cpp' in snames


@pytest.fixture(scope='module')
def venv(dist) -> Dict[str, Path]:
    """A fresh venv with only the wheel installed; torch & co. come from this interpreter's site-packages through
    a .pth path list (so this venv's editable checkout, whose finder needs .pth processing, is not seen)."""
    env_dir = dist['root'] / 'venv'
    subprocess.run([PYTHON, '-m', 'venv', '--without-pip', str(env_dir)], check=True, timeout=300)
    vpy = env_dir / 'bin' / 'python'
    paths = subprocess.run([str(vpy), '-c', 'import sysconfig; print(sysconfig.get_path("purelib")); '
                            'print(sysconfig.get_path("scripts"))'], capture_output=True, text=True, check=True)
    purelib, scripts = (Path(p) for p in paths.stdout.split())
    parents = [p for p in site.getsitepackages() + [sysconfig.get_path('purelib')] if Path(p).is_dir()]
    (purelib / '_parent_site_packages.pth').write_text('\n'.join(dict.fromkeys(parents)) + '\n')
    proc = subprocess.run([PYTHON, '-m', 'pip', '--python', str(vpy), 'install', '--no-deps', '--no-index',
                           '--no-compile', '--quiet', str(dist['wheel'])], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(python=vpy, scripts=scripts, cwd=dist['root'])


def _env() -> Dict[str, str]:
    env = subprocess_env()
    env.pop('PYTHONPATH')  # nothing of the checkout: only what the wheel installed
    return env


def test_installed_cli_finds_a_shipped_recipe(venv, tmp_path):
    """`dropres-finetune --config fashion_mnist_resnet18` after pip install, from a folder without configs/."""
    data = make_image_folder(tmp_path / 'data', n_train=4, n_val=2)
    out = tmp_path / 'run'
    proc = subprocess.run(
        [str(venv['scripts'] / 'dropres-finetune'), '--config', 'fashion_mnist_resnet18', '--model',
         'test_resnet_dropres', '--dataset', str(data), '--train-subset', '12', '--val-subset', '6', '--epochs', '1',
         '-b', '4', '-j', '0', '--cpu', '--output-dir', str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = yaml.safe_load((out / 'args.yaml').read_text())
    # from the recipe: lr, rates, crop, scale; from the command line: model, data, size of the run
    assert (args['lr'], args['drop_rate'], args['res_drop_rate'], args['crop_pct'], args['scale']) == \
        (0.002, 0.1, 0.1, 1.0, [0.6, 1.0])
    assert (args['model'], args['batch_size'], args['epochs']) == ('test_resnet_dropres', 4, 1)
    assert json.loads((out / 'best' / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert 'it/s' not in proc.stderr  # output to a pipe: no progress bars
    where = subprocess.run([str(venv['python']), '-c', 'import timm_dropres; print(timm_dropres.__file__)'],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv['python'].parents[1]))  # the installed wheel, not the checkout
    # the CPU dropout kernel builds (or loads from the cache) from the wheel's own copy of the source
    kernel = subprocess.run([str(venv['python']), '-c', 'from timm_dropres.models import cpu_kernel as k; '
                             'print(k.SOURCE); print(k.build_error())'],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True).stdout.splitlines()
    assert kernel[0].startswith(str(venv['python'].parents[1])) and kernel[1] == 'None', kernel


def test_installed_launcher_runs_a_script(venv, tmp_path):
    script = tmp_path / 'benchmark.py'
    script.write_text('import sys, timm\nprint(type(timm.create_model(sys.argv[1])).__name__)\n')
    proc = subprocess.run([str(venv['scripts'] / 'dropres-timm'), str(script), 'test_resnet_dropres'], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == 'DropResNet', proc.stderr[-2000:]
