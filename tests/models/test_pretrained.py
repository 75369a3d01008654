"""pretrained=True resolves to the base weights and loads them strictly, offline."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import timm
import torch
from hub_helpers import build_hf_cache
from safetensors.torch import load_file, save_file

ARCH, TAG = 'test_resnet', 'r160_in1k'


def make_hf_cache(root: Path, repo: str, tensors: dict) -> Path:
    """``tensors`` as ``model.safetensors`` of ``repo`` in a real huggingface_hub cache layout under ``root``."""
    src = root / 'src' / 'model.safetensors'
    src.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(src))
    commit = 'a' * 40
    return build_hf_cache(root, repo, [src], commit) / 'snapshots' / commit / 'model.safetensors'


def _random_base_weights() -> dict:
    torch.manual_seed(123)
    base = timm.create_model(ARCH)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return {k: v.contiguous() for k, v in base.state_dict().items()}


def test_pretrained_tag_loads_base_weights_from_hf_cache(tmp_path):
    """In a subprocess so HF_HUB_OFFLINE and HF_HUB_CACHE are read at import, as users set them."""
    weights = make_hf_cache(tmp_path, f'timm/{ARCH}.{TAG}', _random_base_weights())
    script = textwrap.dedent(f"""
        import torch, timm, timm_dropres
        from safetensors.torch import load_file
        ref = load_file({str(weights)!r})
        m = timm.create_model('{ARCH}_dropres.{TAG}', pretrained=True)
        sd = m.state_dict()
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
        assert m.pretrained_cfg['hf_hub_id'] == 'timm/{ARCH}.{TAG}'
        m10 = timm.create_model('{ARCH}_dropres.{TAG}', pretrained=True, num_classes=10)
        assert m10.fc.out_features == 10
        assert torch.equal(m10.state_dict()['conv1.0.weight'], ref['conv1.0.weight'])
        print('OK', len(timm_dropres.dropout_sites(m)))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path), HF_HOME=str(tmp_path / 'home'))
    out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith('OK')


def test_pretrained_cfg_overlay_file(tmp_path):
    ref = _random_base_weights()
    path = tmp_path / 'weights.safetensors'
    save_file(ref, str(path))
    m = timm.create_model(f'{ARCH}_dropres.{TAG}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    sd = m.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert load_file(str(path)).keys() == sd.keys()
