"""The README's "wherever a timm model goes" code, run as written (only the folder name is swapped for a real one):
plain timm without the plugin, transformers with it; and the commands it shows for timm's scripts and CPUs."""
from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import timm
import torch
from helpers_train import PYTHON, REPO, subprocess_env
from hub_helpers import code_blocks
from safetensors.torch import load_file, save_file

from timm_dropres.models.hf_folder import save_pretrained_folder

README = (REPO / 'README.md').read_text()
FOLDER_IN_README = "'runs/pets/best'"


def _block(marker: str, lang: str = 'python') -> str:
    found = [b for b in code_blocks(README, lang) if marker in b]
    assert len(found) == 1, f'README should have one {lang} block with {marker!r}'
    return found[0]


@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> dict:
    """A trained-like 1-channel 32 px folder, as dropres-finetune writes it."""
    root = tmp_path_factory.mktemp('readme')
    torch.manual_seed(0)
    model = timm.create_model('test_resnet_dropres', num_classes=3, in_chans=1, res_drop_rate=0.2).eval()
    folder = save_pretrained_folder(model, root / 'best', label_names=['a', 'b', 'c'], data_config=dict(
        input_size=(1, 32, 32), interpolation='bilinear', mean=(0.5,), std=(0.25,), crop_pct=1.0))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
    return dict(root=root, folder=folder, x=x, expected=expected, model=model)


def test_plain_timm_call_loads_without_the_plugin(saved):
    code = _block('removesuffix')
    assert FOLDER_IN_README in code and 'import timm_dropres' not in code
    root = saved['root']
    save_file({'x': saved['x']}, root / 'x.safetensors')
    script = code.replace(FOLDER_IN_README, repr(str(saved['folder']))) + textwrap.dedent(f'''
        import json
        import sys
        from safetensors.torch import load_file, save_file
        assert 'timm_dropres' not in sys.modules
        with torch.no_grad():
            out = model(load_file({str(root / 'x.safetensors')!r})['x'])
        save_file({{'out': out}}, {str(root / 'out.safetensors')!r})
        print(type(model).__name__, json.dumps(timm.data.resolve_model_data_config(model)))
        ''')
    proc = subprocess.run([PYTHON, '-c', 'import torch\n' + script], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, data_cfg = proc.stdout.split(' ', 1)
    assert name == 'ResNet'  # timm's own class: the plugin was not there
    assert json.loads(data_cfg) == dict(input_size=[1, 32, 32], interpolation='bilinear', mean=[0.5], std=[0.25],
                                        crop_pct=1.0, crop_mode='center')  # the saved preprocessing
    # same weights, same network; loaded tensors may sit at other memory alignments, so CPU kernels may round
    # differently (seen on a fresh CI machine): equal to float rounding, not bit for bit
    torch.testing.assert_close(load_file(root / 'out.safetensors')['out'], saved['expected'], rtol=1e-5, atol=1e-6)


def test_transformers_call_loads_with_the_plugin(saved):
    code = _block('AutoModelForImageClassification')
    ns: dict = {}
    exec(code.replace(FOLDER_IN_README, repr(str(saved['folder']))), ns)  # noqa: S102 (the README's code)
    model, processor = ns['model'], ns['processor']
    assert model.config.id2label == {0: 'a', 1: 'b', 2: 'c'}
    assert processor.data_config['input_size'] == (1, 32, 32) and processor.data_config['std'] == (0.25,)
    with torch.no_grad():  # equal up to rounding: transformers' weights sit at other alignments (other kernels)
        torch.testing.assert_close(model(saved['x']).logits, saved['expected'], rtol=0, atol=1e-6)


def test_transformers_without_the_plugin_builds_the_base_network(saved):
    """The README's and cards' advice for transformers without the plugin: architecture= and model_args=."""
    from transformers import AutoModelForImageClassification

    cfg = json.loads((saved['folder'] / 'config.json').read_text())['model_args']
    args = {k: v for k, v in cfg.items() if k not in ('drop_rate', 'res_drop_rate', 'res_drop_pos')}
    model = AutoModelForImageClassification.from_pretrained(
        str(saved['folder']), architecture='test_resnet', model_args=args).eval()
    assert type(model.timm_model).__name__ == 'ResNet'
    with torch.no_grad():
        torch.testing.assert_close(model(saved['x']).logits, saved['expected'], rtol=0, atol=1e-6)


def test_readme_shows_timm_scripts_residual_dropout_and_cpu_processes():
    bash = '\n'.join(code_blocks(README, 'bash'))
    for script in ('train.py', 'validate.py', 'inference.py', 'benchmark.py'):
        assert f'python -m timm_dropres.launch {script}' in bash
    inference = [line for line in bash.splitlines() if 'launch inference.py --model local-dir:' in line]
    assert inference and all('--results-file' in line for line in inference)  # else timm names the file after --model
    assert '--model-kwargs res_drop_rate=0.1' in bash  # residual dropout is off by default: how to turn it on
    assert 'Residual dropout is off by default (`res_drop_rate=0.0`' in ' '.join(README.split())
    cpu = [line for line in bash.splitlines() if line.startswith('accelerate launch') and ' --cpu' in line]
    assert cpu and all('--multi_gpu' in line and '--num_processes 2' in line for line in cpu)
    assert 'dropres-finetune --config fashion_mnist_resnet18' in bash and (REPO / 'LICENSE').is_file()
    assert (REPO / 'LICENSE').read_text().lstrip().startswith('Apache License')
