"""Publishing to the Hub, offline: dry-run contents, round trips through local-dir: and a real HF cache
(hf-hub:, plain timm, a published tag), the upload call sequence, the token, and bad input."""
from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest
import timm
import torch
from hub_helpers import (
    ARCH,
    IMG,
    LABELS,
    RecordingApi,
    build_hf_cache,
    code_blocks,
    make_model,
    make_run,
    make_summary,
    sites,
)
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from timm_dropres import describe
from timm_dropres.cli.push import main as push_main
from timm_dropres.hub.push import PushError, push

REPO = 'alice/test_resnet_dropres.fmnist'
CANARY = 'hf_CANARYcanary0123456789tokenXYZ'
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp('hub')
    model = make_model()
    summary = make_summary()
    folder = make_run(root, model, summary)
    out = root / 'dry'
    result = push(folder, REPO, dry_run=True, out_dir=out)
    x = torch.randn(3, 1, IMG, IMG)
    return dict(root=root, model=model, summary=summary, folder=folder, out=out, result=result, x=x)


def _train_out(model, x, seed=123):
    """Train-mode output with a fixed dropout RNG: equal only if every dropout sits at the same place."""
    m = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    with torch.no_grad():
        return m(x)


# ----------------------------------------------------------------------------------------------- dry run
def test_dry_run_writes_exactly_the_repo_files(run):
    out, folder = run['out'], run['folder']
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert run['result'].files == ['README.md', 'config.json', 'model.safetensors'] and run['result'].dry_run
    assert not [p for p in out.rglob('*') if p.suffix in ('.bin', '.pth', '.pt', '.pkl', '.ckpt')]
    assert (out / 'model.safetensors').read_bytes() == (folder / 'model.safetensors').read_bytes()
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == ARCH and cfg['num_classes'] == len(LABELS) and cfg['label_names'] == LABELS
    assert {k: cfg['model_args'][k] for k in ('drop_rate', 'res_drop_rate', 'res_drop_pos')} == \
        dict(drop_rate=0.25, res_drop_rate=0.15, res_drop_pos='after_last_bn')
    pcfg = cfg['pretrained_cfg']
    assert pcfg['input_size'][0] == 1 and len(pcfg['mean']) == len(pcfg['std']) == 1
    assert {'crop_pct', 'interpolation', 'num_classes'} <= set(pcfg)
    # the trainer's informational fields are published without the local directory layout; the rest is verbatim
    src = json.loads((folder / 'config.json').read_text())
    assert src['dataset'].startswith('Fashion-MNIST (/usr/share/')
    assert cfg['dataset'] == 'Fashion-MNIST (.../fashion-mnist), train + test'
    assert {k: v for k, v in cfg.items() if k != 'dataset'} == {k: v for k, v in src.items() if k != 'dataset'}


def test_dry_run_card_metadata_matches_summary(run):
    card = ModelCard.load(run['out'] / 'README.md')
    data, summary = card.data, run['summary']
    assert data.library_name == 'timm' and data.pipeline_tag == 'image-classification'
    assert {'image-classification', 'timm', 'dropres'} <= set(data.tags)
    assert data.license == 'apache-2.0'
    assert data.datasets == ['zalando-datasets/fashion_mnist']
    assert data.base_model == 'timm/test_resnet.r160_in1k'  # the pretrained tag the summary's run started from
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {'accuracy': summary['best']['top1'], 'top_5_accuracy': summary['best']['top5']}
    assert {r.dataset_type for r in data.eval_results} == {'zalando-datasets/fashion_mnist'}
    assert card.data.to_dict()['model-index'][0]['name'] == REPO


def test_dry_run_refuses_non_empty_out_dir(run, tmp_path):
    (tmp_path / 'keep.txt').write_text('x')
    with pytest.raises(PushError, match='not an empty folder'):
        push(run['folder'], REPO, dry_run=True, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.txt']
    with pytest.raises(PushError, match='to out_dir; pass one'):
        push(run['folder'], REPO, dry_run=True)


# ----------------------------------------------------------------------------------------------- round trips
def test_round_trip_local_dir(run):
    model, x = run['model'], run['x']
    loaded = timm.create_model(f'local-dir:{run["out"]}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sites(loaded) == sites(model) and describe(loaded) == describe(model)
    assert torch.equal(_train_out(loaded, x), _train_out(model, x))


_HUB_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    card, x_path, out_path = sys.argv[1:4]
    x = load_file(x_path)['x']
    snippets = json.load(open(card))
    outs, info = {}, {}
    ns = {}
    exec(snippets['plain'], ns)  # the card's "plain timm" snippet, verbatim
    import timm
    info['plain_type'] = type(ns['model']).__name__
    info['plain_data_cfg'] = timm.data.resolve_model_data_config(ns['model'])
    with torch.no_grad():
        outs['plain'] = ns['model'](x)
    ns = {}
    exec(snippets['transformers_plain'], ns)  # the card's transformers snippet without the plugin, verbatim
    info['hf_plain_type'] = type(ns['model'].timm_model).__name__
    with torch.no_grad():
        outs['hf_plain'] = ns['model'](x).logits
    info['plugin_loaded_for_plain'] = 'timm_dropres' in sys.modules
    ns = {}
    exec(snippets['dropres'], ns)  # the card's timm_dropres snippet, verbatim
    import timm_dropres
    m = ns['model']
    info['hub_sites'] = [[s.name, s.where, s.p] for s in timm_dropres.dropout_sites(m)]
    info['hub_data_cfg'] = timm.data.resolve_model_data_config(m)
    with torch.no_grad():
        outs['hub'] = m(x)
        m.train(); torch.manual_seed(123); outs['hub_train'] = m(x)
    ns = {}
    exec(snippets['transformers'], ns)  # the card's transformers snippet, verbatim
    info['hf_type'] = type(ns['model'].timm_model).__name__
    info['hf_id2label'] = ns['model'].config.id2label
    info['hf_processor_size'] = list(ns['processor'].data_config['input_size'])
    with torch.no_grad():
        outs['hf'] = ns['model'](x).logits
    info['listed'] = timm.list_pretrained('test_resnet_dropres*')
    info['default_tag'] = timm.models.get_pretrained_cfg('test_resnet_dropres').tag
    info['tag_hub_id'] = timm.models.get_pretrained_cfg('test_resnet_dropres.fmnist_ft').hf_hub_id
    t = timm.create_model('test_resnet_dropres.fmnist_ft', pretrained=True).eval()
    info['tag_num_classes'] = t.num_classes
    with torch.no_grad():
        outs['tag'] = t(x)
    save_file({k: v.contiguous() for k, v in outs.items()}, out_path)
    print(json.dumps(info))
''')


def card_snippets(card_text: str) -> Dict[str, str]:
    """The card's four Python usage blocks by role: timm with/without the plugin, transformers with/without it."""
    blocks = code_blocks(card_text)
    return dict(
        plain=next(b for b in blocks if 'snapshot_download' in b),
        dropres=next(b for b in blocks if "timm.create_model('hf-hub:" in b),
        transformers=next(b for b in blocks if 'AutoModel' in b and 'import timm_dropres' in b),
        transformers_plain=next(b for b in blocks if 'AutoModel' in b and 'timm_dropres' not in b),
    )


@pytest.fixture(scope='module')
def hub_run(run):
    """One subprocess (fresh imports, HF_HUB_OFFLINE=1) loading the pushed files from a real HF cache layout."""
    root, out = run['root'], run['out']
    cache = root / 'hf_cache'
    build_hf_cache(cache, REPO, [out / 'config.json', out / 'model.safetensors', out / 'README.md'])
    (root / 'snippets.json').write_text(json.dumps(card_snippets((out / 'README.md').read_text())))
    (root / 'published.json').write_text(json.dumps({ARCH: {'fmnist_ft': run['result'].registry_entry}}))
    save_file({'x': run['x']}, root / 'x.safetensors')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(root / 'hf_home'),
               TIMM_DROPRES_PUBLISHED=str(root / 'published.json'),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    env.pop('HF_TOKEN', None)
    proc = subprocess.run([sys.executable, '-c', _HUB_SCRIPT, str(root / 'snippets.json'), str(root / 'x.safetensors'),
                           str(root / 'outs.safetensors')], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), load_file(root / 'outs.safetensors')


def test_round_trip_hf_hub_cache(run, hub_run):
    info, outs = hub_run
    model, x = run['model'], run['x']
    with torch.no_grad():
        assert torch.equal(outs['hub'], model(x))
    assert [tuple(s) for s in info['hub_sites']] == sites(model)
    assert torch.equal(outs['hub_train'], _train_out(model, x))


def test_plain_timm_snippet_loads_bit_identical(run, hub_run):
    info, outs = hub_run
    assert info['plugin_loaded_for_plain'] is False  # the snippet ran without timm_dropres imported
    assert info['plain_type'] == 'ResNet'
    assert info['plain_data_cfg'] == info['hub_data_cfg']  # the published preprocessing, not resnet's defaults
    with torch.no_grad():
        assert torch.equal(outs['plain'], run['model'](run['x']))


def test_transformers_snippets_load_the_published_model(run, hub_run):
    """The card's transformers code, with the plugin (dropres network) and without it (timm's base network)."""
    info, outs = hub_run
    assert info['hf_type'] == 'DropResNet' and info['hf_plain_type'] == 'ResNet'
    assert info['hf_id2label'] == {str(i): name for i, name in enumerate(LABELS)}  # from label_names
    assert info['hf_processor_size'] == [1, IMG, IMG]
    with torch.no_grad():
        expected = run['model'](run['x'])
    # equal up to rounding: transformers' loaded weights may sit at other memory alignments (other CPU kernels)
    torch.testing.assert_close(outs['hf'], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(outs['hf_plain'], expected, rtol=0, atol=1e-6)


def test_published_tag_resolves_to_its_hub_id(run, hub_run):
    info, outs = hub_run
    assert 'test_resnet_dropres.fmnist_ft' in info['listed']
    assert info['tag_hub_id'] == REPO
    assert info['default_tag'] == 'r160_in1k'  # a published tag does not become the default
    assert info['tag_num_classes'] == len(LABELS)  # num_classes / in_chans come from the registry entry
    with torch.no_grad():
        assert torch.equal(outs['tag'], run['model'](run['x']))


# ----------------------------------------------------------------------------------------------- upload
def test_upload_sequence_new_repo(run):
    api = RecordingApi(has_card=False)
    result = push(run['folder'], REPO, token=CANARY, private=True, commit_message='first', api=api)
    assert api.names == ['create_repo', 'file_exists', 'upload_folder']
    create, exists, upload = (kw for _, kw in api.calls)
    assert create['repo_id'] == REPO and create['private'] is True and create['exist_ok'] is True
    assert exists['filename'] == 'README.md'
    assert upload['repo_id'] == REPO and upload['commit_message'] == 'first'
    assert upload['create_pr'] is False and upload['revision'] is None
    assert all(kw['token'] == CANARY for _, kw in api.calls)  # the token reaches the API, explicitly
    assert sorted(api.uploaded) == ['README.md', 'config.json', 'model.safetensors']
    assert api.uploaded['model.safetensors'] == (run['folder'] / 'model.safetensors').read_bytes()
    assert api.uploaded['README.md'] == (run['out'] / 'README.md').read_bytes()  # same card as the dry run
    assert result.card == 'written' and result.commit_url.startswith(f'https://huggingface.co/{REPO}/commit/')


def test_upload_keeps_existing_card_unless_overwrite(run):
    api = RecordingApi(has_card=True)
    result = push(run['folder'], REPO, token=CANARY, revision='v2', create_pr=True, api=api)
    assert api.names == ['create_repo', 'create_branch', 'file_exists', 'upload_folder']
    assert api.calls[1][1]['branch'] == 'v2' and api.calls[2][1]['revision'] == 'v2'
    assert api.calls[3][1]['revision'] == 'v2' and api.calls[3][1]['create_pr'] is True
    assert sorted(api.uploaded) == ['config.json', 'model.safetensors']  # weights + config updated, card kept
    assert result.card == 'kept'

    api = RecordingApi(has_card=True)
    result = push(run['folder'], REPO, token=CANARY, overwrite_card=True, api=api)
    assert sorted(api.uploaded) == ['README.md', 'config.json', 'model.safetensors'] and result.card == 'overwritten'


def test_token_from_env_when_not_given(run, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', CANARY)
    api = RecordingApi()
    push(run['folder'], REPO, api=api)
    assert all(kw['token'] == CANARY for _, kw in api.calls)


# ----------------------------------------------------------------------------------------------- security / bad input
def _bad_folders(root: Path, folder: Path) -> dict:
    cases = {}

    def clone(name: str) -> Path:
        dst = root / name / 'best'
        dst.mkdir(parents=True)
        for f in folder.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    d = clone('no_weights')
    (d / 'model.safetensors').unlink()
    cases['no_weights'] = (d, 'has no model.safetensors')
    d = clone('no_config')
    (d / 'config.json').unlink()
    cases['no_config'] = (d, 'has no config.json')
    for name, arch, msg in (('plain_arch', 'test_resnet', 'not a dropres model .*push_to_hf_hub'),
                            ('unknown_arch', 'nonexistent_dropres', 'not a dropres model')):
        d = clone(name)
        cfg = json.loads((d / 'config.json').read_text())
        cfg['architecture'] = arch
        (d / 'config.json').write_text(json.dumps(cfg))
        cases[name] = (d, msg)
    d = clone('no_dropout_args')
    cfg = json.loads((d / 'config.json').read_text())
    del cfg['model_args']['res_drop_pos']
    (d / 'config.json').write_text(json.dumps(cfg))
    cases['no_dropout_args'] = (d, r"lack \['res_drop_pos'\]")
    d = clone('torch_save_pickle')
    torch.save(load_file(folder / 'model.safetensors'), d / 'model.safetensors')
    cases['torch_save_pickle'] = (d, 'not a safetensors file.*pickle')
    d = clone('raw_pickle')
    (d / 'model.safetensors').write_bytes(pickle.dumps({'conv1.weight': [1.0]}))
    cases['raw_pickle'] = (d, 'not a safetensors file.*pickle')
    d = clone('truncated')
    data = (folder / 'model.safetensors').read_bytes()
    (d / 'model.safetensors').write_bytes(data[: len(data) // 2])
    cases['truncated'] = (d, 'not a valid safetensors file')
    d = clone('shape_mismatch')
    cfg = json.loads((d / 'config.json').read_text())
    cfg['num_classes'] = cfg['model_args']['num_classes'] = 7
    cfg['label_names'] = [f'c{i}' for i in range(7)]  # consistent (else refused earlier, by the name count)
    (d / 'config.json').write_text(json.dumps(cfg))
    cases['shape_mismatch'] = (d, 'does not match test_resnet_dropres.*wrong shape')
    # passes every header check (the model builds on meta), but timm's local-dir: loader passes its own
    # pretrained_cfg_overlay too, so users could not load it: only what loads is published (issue 13)
    d = clone('pretrained_cfg_overlay')
    cfg = json.loads((d / 'config.json').read_text())
    cfg['model_args']['pretrained_cfg_overlay'] = dict(file='/home/alice/weights.safetensors')
    (d / 'config.json').write_text(json.dumps(cfg))
    cases['pretrained_cfg_overlay'] = (d, r'does not load with timm.create_model\("local-dir:.*pretrained_cfg_overlay')
    cases['not_a_folder'] = (root / 'missing', 'is not a folder')
    return cases


def test_valid_safetensors_starting_like_a_pickle_is_accepted(run, tmp_path):
    """The header length is the first 8 bytes, so a real safetensors file can start with 0x80 or b'PK'."""
    folder = tmp_path / 'run' / 'best'
    folder.mkdir(parents=True)
    (folder / 'config.json').write_bytes((run['folder'] / 'config.json').read_bytes())
    tensors = load_file(run['folder'] / 'model.safetensors')
    for pad in range(300):
        save_file(tensors, folder / 'model.safetensors', metadata={'pad': 'x' * pad})
        if (folder / 'model.safetensors').read_bytes()[:1] == b'\x80':
            break
    assert (folder / 'model.safetensors').read_bytes()[:1] == b'\x80'
    assert push(folder, REPO, dry_run=True, out_dir=tmp_path / 'out').files[-1] == 'model.safetensors'


@pytest.mark.parametrize('repo_id', ['no-namespace', 'a/b/c', 'alice/bad name', 'alice/-x-', 'alice/x..y', ''])
def test_invalid_repo_id_fails_before_upload(run, repo_id):
    api = RecordingApi()
    with pytest.raises(PushError, match='invalid repo id') as e:
        push(run['folder'], repo_id, token=CANARY, api=api)
    assert api.calls == [] and CANARY not in str(e.value)


def test_bad_folders_fail_before_upload_with_clear_errors(run, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    for name, (folder, msg) in _bad_folders(tmp_path, run['folder']).items():
        api = RecordingApi()
        with pytest.raises(PushError, match=msg) as e:
            push(folder, REPO, token=CANARY, api=api)
        assert api.calls == [], name
        assert CANARY not in str(e.value) and CANARY not in repr(e.value), name
        # the CLI prints one error line and exits 2, without writing anything
        rc = push_main([str(folder), '--repo-id', REPO, '--token', CANARY, '--dry-run',
                        '--out-dir', str(tmp_path / f'out_{name}')])
        assert rc == 2 and not (tmp_path / f'out_{name}').exists(), name
    captured = capsys.readouterr()
    assert 'error:' in captured.err
    assert CANARY not in captured.out + captured.err + caplog.text


def test_token_never_written_logged_or_raised(run, tmp_path, caplog, capsys):
    """A canary token, given three ways and also sitting in the trainer's summary, never leaves the API calls."""
    caplog.set_level(logging.DEBUG)
    model = run['model']
    summary = make_summary(config={**make_summary()['config'], 'hub_token': CANARY, 'push_args': f'--token {CANARY}'})
    folder = make_run(tmp_path, model, summary)
    api = RecordingApi(has_card=False)
    push(folder, REPO, token=CANARY, api=api)
    assert CANARY not in api.uploaded['README.md'].decode()
    assert all(CANARY.encode() not in data for data in api.uploaded.values())
    assert push_main([str(folder), '--repo-id', REPO, '--token', CANARY, '--dry-run',
                      '--out-dir', str(tmp_path / 'dry')]) == 0
    with pytest.raises(PushError) as e:  # an error raised after the token was read
        push(folder, 'not valid', token=CANARY, api=RecordingApi())
    assert CANARY not in str(e.value)
    captured = capsys.readouterr()
    assert CANARY not in captured.out + captured.err + caplog.text
    written = [p for p in (tmp_path / 'dry').rglob('*') if p.is_file()]
    assert len(written) == 3
    for path in written:
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def test_cli_dry_run(run, tmp_path, capsys):
    out = tmp_path / 'x'
    assert push_main([str(run['folder']), '--repo-id', REPO, '--dry-run', '--out-dir', str(out), '-q']) == 0
    printed = capsys.readouterr().out
    assert f"hf-hub:{REPO}" in printed and '"fmnist_ft"' not in printed and f'"{ARCH}"' in printed
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert (out / 'README.md').read_text() == (run['out'] / 'README.md').read_text()


def test_real_trainer_run_publishes(tmp_path):
    """The trainer's actual outputs (best/ + summary.json, today's schema) go through push unchanged in meaning."""
    from timm_dropres.training.config import FinetuneConfig
    from timm_dropres.training.data import DataBundle, TensorImageDataset
    from timm_dropres.training.trainer import finetune

    g = torch.Generator().manual_seed(0)
    images, targets = (torch.rand(24, 28, 28, generator=g) * 255).to(torch.uint8), torch.arange(24) % 4
    data = DataBundle(TensorImageDataset(images[:16], targets[:16]), TensorImageDataset(images[16:], targets[16:]),
                      LABELS, 1, 'tiny')
    cfg = FinetuneConfig(model=ARCH, dataset='fashion_mnist', epochs=1, batch_size=8, img_size=IMG, num_workers=0,
                         progress=False, output_dir=str(tmp_path / 'run'), cpu=True, res_drop_rate=0.1, drop_rate=0.2)
    summary = finetune(cfg, data)
    result = push(tmp_path / 'run' / 'best', REPO, dry_run=True, out_dir=tmp_path / 'dry')
    assert result.files == ['README.md', 'config.json', 'model.safetensors']
    card = ModelCard.load(tmp_path / 'dry' / 'README.md')
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == \
        {'accuracy': summary['best']['top1'], 'top_5_accuracy': summary['best']['top5']}
    assert card.data.base_model is None  # not started from pretrained weights
    x = torch.randn(2, 1, IMG, IMG)
    a = timm.create_model(f'local-dir:{tmp_path / "run" / "best"}', pretrained=True).eval()
    b = timm.create_model(f'local-dir:{tmp_path / "dry"}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert sites(b) == [(n, w, p) for n, w, p in sites(a)] and sites(b)[-1] == ('head_drop', 'head_before_pool', 0.2)
