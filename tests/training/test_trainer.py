"""The fine-tuning library end to end: outputs, reload, resume equality, two processes, bf16, bad input."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from helpers_train import PYTHON, REPO, make_image_folder, subprocess_env, tiny_config
from hub_helpers import build_hf_cache
from safetensors.torch import load_file, save_file

import timm_dropres
from timm_dropres.cli.finetune import main as finetune_main
from timm_dropres.training import fmnist
from timm_dropres.training.build import build_model, resolve_model
from timm_dropres.training.checkpoints import CheckpointError, list_checkpoints
from timm_dropres.training.config import ValidateConfig
from timm_dropres.training.data import DataError
from timm_dropres.training.evaluate import validate
from timm_dropres.training.runs import OutputDirError
from timm_dropres.training.trainer import finetune

HAS_FMNIST = fmnist.find_fashion_mnist() is not None


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
    # 15 val images: odd, and not a multiple of the eval batch or of 2 processes
    return make_image_folder(tmp_path_factory.mktemp('data') / 'shapes', n_train=12, n_val=5)


@pytest.fixture(scope='module')
def trained_run(dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp('runs') / 'e2e'
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: runs before the autouse one-thread fixture
    try:
        summary = finetune(tiny_config(dataset, out, res_drop_rate=0.2, eval_batch_size=4, checkpoint_every=4))
    finally:
        torch.set_num_threads(n)
    return out, summary


def test_end_to_end_outputs_and_reload(dataset, trained_run):
    out, s = trained_run
    assert {p.name for p in out.iterdir()} == {'best', 'last', 'checkpoints', 'summary.json', 'summary.csv',
                                               'args.yaml'}
    assert json.loads((out / 'summary.json').read_text())['best'] == s['best']
    assert s['epochs_completed'] == 1 and s['global_steps'] == 9 and not s['interrupted']
    assert s['last']['num_samples'] == s['val_size'] == 15
    assert s['throughput']['train_img_per_s'] > 0 and s['config']['res_drop_rate'] == 0.2
    assert s['versions']['timm'] == timm.__version__
    assert sum(s['last']['per_class_count'].values()) == 15
    # checkpoints: step 4 and step 8 mid-epoch, then the epoch end (step 9); keep_checkpoints=2 keeps the last two
    assert [p.name for p in list_checkpoints(out)] == ['step_000000008', 'step_000000009']
    assert not [p for p in (out / 'checkpoints').iterdir() if p.name.startswith('.')]

    cfg = json.loads((out / 'best' / 'config.json').read_text())
    assert cfg['architecture'] == 'test_resnet_dropres' and cfg['num_classes'] == 3
    assert cfg['label_names'] == ['circle', 'square', 'stripes']
    assert cfg['model_args']['res_drop_rate'] == 0.2 and cfg['pretrained_cfg']['input_size'] == [3, 32, 32]

    model = timm.create_model(f'local-dir:{out / "best"}', pretrained=True)
    assert timm_dropres.dropout_args(model)['res_drop_rate'] == 0.2
    r = validate(ValidateConfig(model=f'local-dir:{out / "best"}', dataset=str(dataset), num_workers=0, cpu=True,
                                batch_size=4))
    assert r['num_samples'] == 15
    assert r['top1'] == pytest.approx(s['best']['top1']) and r['top5'] == pytest.approx(s['best']['top5'])
    assert r['loss'] == pytest.approx(s['best']['loss'], rel=1e-5, abs=1e-6)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(dataset, tmp_path):
    """Stopped mid-epoch and resumed (with a different worker count) == one uninterrupted run, bit for bit.

    RandAugment, random erasing, Mixup, EMA, gradient accumulation and warmup are all on, so every piece
    of state that resume must restore (RNG, data position, optimizer, EMA, schedule) is exercised.
    """
    kw = dict(epochs=2, aa='rand-m9-mstd0.5', reprob=0.25, mixup=0.2, ema=True, ema_decay=0.9,
              grad_accum_steps=2, warmup_epochs=0.5)
    full = finetune(tiny_config(dataset, tmp_path / 'full', **kw))
    part = finetune(tiny_config(dataset, tmp_path / 'part', stop_after_steps=3, **kw))
    assert part['interrupted'] and part['global_steps'] == 3 and not (tmp_path / 'part' / 'last').exists()
    done = finetune(tiny_config(dataset, tmp_path / 'part', resume=str(tmp_path / 'part'), num_workers=2, **kw))
    assert done['global_steps'] == full['global_steps'] == 10
    for name in ('last/model.safetensors', 'best/model.safetensors'):
        a, b = load_file(tmp_path / 'full' / name), load_file(tmp_path / 'part' / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ema_a = load_file(list_checkpoints(tmp_path / 'full')[-1] / 'ema.safetensors')
    ema_b = load_file(list_checkpoints(tmp_path / 'part')[-1] / 'ema.safetensors')
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    strip = ('eval_time_s',)
    assert [{k: v for k, v in h.items() if k not in strip} for h in full['history']] == \
           [{k: v for k, v in h.items() if k not in strip} for h in done['history']]


_AUDIT = textwrap.dedent('''
    """Test-only: record every file this non-main process creates or changes under AUDIT_ROOT."""
    import builtins, io, os, shutil
    _root, _log, _rank = os.environ.get('AUDIT_ROOT'), os.environ.get('AUDIT_LOG'), os.environ.get('RANK', '0')
    if _root and _rank != '0':
        def _note(op, path):
            p = os.path.abspath(os.fspath(path))
            if p.startswith(_root):
                with _open(f'{_log}.{_rank}', 'a') as f:
                    f.write(f'{op} {os.path.relpath(p, _root)}\\n')
        _open = builtins.open
        with _open(f'{_log}.{_rank}', 'a') as f:
            f.write('hook active\\n')
        def _patched_open(file, mode='r', *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in 'wax+'):
                _note('open', file)
            return _open(file, mode, *a, **k)
        builtins.open = io.open = _patched_open
        for _name in ('replace', 'rename', 'mkdir', 'remove', 'unlink', 'rmdir'):
            def _wrap(fn, name=_name):
                def inner(path, *a, **k):
                    existed = os.path.exists(path)
                    out = fn(path, *a, **k)
                    if not (name == 'mkdir' and existed):  # makedirs(exist_ok=True) probes are not writes
                        _note(name, path)
                    return out
                return inner
            setattr(os, _name, _wrap(getattr(os, _name)))
        _rmtree = shutil.rmtree
        def _patched_rmtree(path, *a, **k):
            _note('rmtree', path)
            return _rmtree(path, *a, **k)
        shutil.rmtree = _patched_rmtree
''')


@pytest.mark.slow
def test_two_processes_on_cpu(dataset, tmp_path):
    """accelerate's launcher, 2 CPU processes (gloo): exact sample count, and only rank 0 writes outputs."""
    out = tmp_path / 'ddp'
    audit = tmp_path / 'audit'
    audit.mkdir()
    (audit / 'sitecustomize.py').write_text(_AUDIT)
    env = subprocess_env(AUDIT_ROOT=str(out), AUDIT_LOG=str(tmp_path / 'writes'))
    env['PYTHONPATH'] = f'{audit}:{env["PYTHONPATH"]}'
    cmd = [PYTHON, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           str(REPO / 'scripts' / 'finetune.py'), '--cpu', '--model', 'test_resnet_dropres', '--dataset', str(dataset),
           '--epochs', '1', '--batch-size', '4', '--eval-batch-size', '4', '--img-size', '32', '--num-workers', '0',
           '--output-dir', str(out), '--no-progress', '--checkpoint-every', '2']
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['num_processes'] == 2 and s['distributed_type'] == 'DistributedType.MULTI_CPU'
    assert s['last']['num_samples'] == s['val_size'] == 15  # gather_for_metrics drops the padding
    assert s['global_steps'] == 36 // (4 * 2)  # drop_last: only full global batches
    writes = (tmp_path / 'writes.1').read_text().splitlines()
    assert writes[0] == 'hook active'
    # rank 1 may write only its own RNG state into checkpoint folders (accelerate: one file per process)
    assert all(w.split()[-1].endswith('random_states_1.pkl') for w in writes[1:]), writes
    assert all(len(list(c.glob('random_states_*.pkl'))) == 2 for c in list_checkpoints(out))


def test_bf16_mixed_precision_on_cpu(dataset, tmp_path):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = torch.nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8))
    if y.dtype != torch.bfloat16:
        pytest.skip('this CPU build does not autocast convolutions to bf16')
    s = finetune(tiny_config(dataset, tmp_path / 'bf16', mixed_precision='bf16'))
    assert s['mixed_precision'] == 'bf16'
    assert torch.isfinite(torch.tensor(s['last']['loss'])) and s['last']['num_samples'] == 15


def test_channels_last_run_exports_and_reloads(dataset, tmp_path):
    """--channels-last trains in that layout and still writes safetensors folders (found by gpu_check.sh)."""
    out = tmp_path / 'cl'
    s = finetune(tiny_config(dataset, out, channels_last=True, checkpoint_every=4))
    assert s['last']['num_samples'] == 15
    loaded = timm.create_model(f'local-dir:{out / "last"}', pretrained=True)
    assert all(t.is_contiguous() for t in loaded.state_dict().values())


@pytest.mark.fmnist
@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason='Debian dataset-fashion-mnist is not installed '
                                           '(apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_subset_learns(tmp_path):
    s = finetune(tiny_config('fashion_mnist', tmp_path / 'fm', train_subset=400, val_subset=200, epochs=3,
                             batch_size=16, scale=[0.7, 1.0], color_jitter=0.0, lr=2e-3))
    assert s['in_chans'] == 1 and s['num_classes'] == 10 and s['last']['num_samples'] == 200
    assert s['label_names'] == fmnist.CLASSES
    assert s['best']['top1'] > 35.0, s['history']  # chance is 10 %


def test_pretrained_replaces_the_classifier_and_logs_it(tmp_path, caplog):
    src = timm.create_model('test_resnet_dropres', num_classes=1000)
    save_file(src.state_dict(), str(tmp_path / 'w.safetensors'))
    cfg = tiny_config('unused', tmp_path / 'o', pretrained=True, pretrained_file=str(tmp_path / 'w.safetensors'))
    with caplog.at_level(logging.INFO, logger='timm_dropres.training.build'):
        model, _ = build_model(cfg, resolve_model(cfg), num_classes=3, in_chans=1)
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    assert 'replaced it with a new, randomly initialised 3-class classifier' in caplog.text
    assert 'adapted it to 1' in caplog.text
    # the backbone is the pretrained one (first conv summed over RGB by timm's adapt_input_conv)
    torch.testing.assert_close(model.conv1[3].weight, src.conv1[3].weight)


def test_pretrained_from_a_local_hub_cache(tmp_path):
    """--pretrained through timm's Hub download path, served offline from a hand-built HF cache."""
    src = timm.create_model('test_resnet', num_classes=1000)
    save_file(src.state_dict(), str(tmp_path / 'model.safetensors'))
    build_hf_cache(tmp_path / 'hub', 'timm/test_resnet.r160_in1k', [tmp_path / 'model.safetensors'])
    code = ('import timm_dropres, torch; from timm_dropres.training.config import FinetuneConfig; '
            'from timm_dropres.training.build import build_model, resolve_model; '
            'c = FinetuneConfig(model="test_resnet_dropres.r160_in1k", pretrained=True); '
            'm, _ = build_model(c, resolve_model(c), 5, 3); '
            'print(m.num_classes, float(m.conv1[0].weight.sum()))')
    proc = subprocess.run([PYTHON, '-c', code], env=subprocess_env(HF_HUB_CACHE=str(tmp_path / 'hub')),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, wsum = proc.stdout.split()
    assert int(n) == 5 and float(wsum) == pytest.approx(float(src.conv1[0].weight.detach().sum()), rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        finetune(tiny_config(tmp_path / 'missing', tmp_path / 'o'))


def test_empty_class_folder(dataset, tmp_path):
    root = tmp_path / 'ds'
    shutil.copytree(dataset, root)
    (root / 'train' / 'ghost').mkdir()
    with pytest.raises(DataError, match='ghost has no images'):
        finetune(tiny_config(root, tmp_path / 'o'))


def test_unknown_model(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'resnet18_dropress'.*resnet18_dropres"):
        finetune(tiny_config(dataset, tmp_path / 'o', model='resnet18_dropress'))


@pytest.mark.parametrize('kw, match', [
    (dict(res_drop_rate=1.0), r'res_drop_rate must be in \[0, 1\)'),
    (dict(drop_rate=-0.1), r'drop_rate must be in \[0, 1\)'),
    (dict(res_drop_pos='before_bn'), 'res_drop_pos must be one of'),
    (dict(model='resnet18', res_drop_rate=0.1), 'use model resnet18_dropres'),
    (dict(model='vit_tiny_patch16_224', res_drop_pos='auto'), 'only ResNet/ResNetV2'),
])
def test_invalid_dropout_options(dataset, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        finetune(tiny_config(dataset, tmp_path / 'o', **kw))
    assert not (tmp_path / 'o').exists()  # refused before anything was written


def test_cli_reports_bad_input_cleanly(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error: the config class validates on creation
        finetune_main(['--model', 'test_resnet_dropres', '--dataset', str(dataset), '--res-drop-rate', '1.5',
                       '--output-dir', str(tmp_path / 'o'), '--cpu'])
    assert e.value.code == 2 and 'res_drop_rate must be in [0, 1), got 1.5' in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()  # nothing written


def test_existing_output_is_not_overwritten(dataset, trained_run):
    out, _ = trained_run
    before = (out / 'summary.json').read_bytes()
    with pytest.raises(OutputDirError, match='already holds a run.*; pass overwrite to replace'):
        finetune(tiny_config(dataset, out))
    assert (out / 'summary.json').read_bytes() == before


def test_overwrite_replaces_only_run_artifacts(dataset, tmp_path):
    out = tmp_path / 'o'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    (out / 'summary.json').write_text('{"old": true}')
    for overwrite in (False, True):  # --overwrite removes only a run's outputs, so it refuses this folder
        with pytest.raises(OutputDirError, match=r"files a run does not write: \['notes.txt'\]"):
            finetune(tiny_config(dataset, out, overwrite=overwrite))
    assert (out / 'notes.txt').read_text() == 'mine'
    (out / 'notes.txt').unlink()
    with pytest.raises(OutputDirError, match='already holds a run'):
        finetune(tiny_config(dataset, out))
    s = finetune(tiny_config(dataset, out, overwrite=True))
    assert json.loads((out / 'summary.json').read_text())['global_steps'] == s['global_steps']


def test_resume_from_a_different_model_is_refused(dataset, trained_run, tmp_path):
    out, _ = trained_run
    with pytest.raises(CheckpointError, match="run: model: checkpoint 'test_resnet_dropres', this run 'resnet10t_drop"):
        finetune(tiny_config(dataset, tmp_path / 'o', resume=str(out), model='resnet10t_dropres'))
    with pytest.raises(CheckpointError, match=': res_drop_rate: checkpoint 0.2, this run 0.3'):
        finetune(tiny_config(dataset, tmp_path / 'o', resume=str(out), res_drop_rate=0.3))


def test_corrupt_checkpoint_is_reported(dataset, trained_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(trained_run[0], run)
    latest = list_checkpoints(run)[-1]
    weights = latest / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r'step_000000009 is corrupt.*older complete checkpoints.*step_000000008'):
        finetune(tiny_config(dataset, run, resume=str(run), epochs=2, res_drop_rate=0.2))
    (latest / 'trainer_state.json').write_text('{not json')
    with pytest.raises(CheckpointError, match='cannot read trainer_state.json.*step_000000008'):
        finetune(tiny_config(dataset, run, resume=str(latest), epochs=2, res_drop_rate=0.2))
    with pytest.raises(CheckpointError, match='no checkpoints found'):
        finetune(tiny_config(dataset, tmp_path / 'o', resume=str(tmp_path)))


def test_multistep_milestones_divide_the_lr_at_their_epochs(dataset, tmp_path):
    """--sched multistep --decay-milestones reach timm's scheduler, counted in epochs (stepped per update)."""
    cfg = tiny_config(dataset, tmp_path / 'ms', epochs=3, lr=0.1, sched='multistep', decay_milestones=[1, 2],
                      decay_rate=0.1, opt='sgd')
    history = finetune(cfg)['history']
    assert [h['lr'] for h in history] == pytest.approx([0.01, 0.001, 0.001])  # lr after each epoch's last step


def test_model_kwargs_and_pad_crop_reach_the_model_and_the_loader(dataset, tmp_path):
    cfg = tiny_config(dataset, tmp_path / 'kw', model='resnet18_dropres', pad_crop=4,
                      model_kwargs=dict(channels=[8, 8, 8, 8], stem_width=8, stem_type='deep'))
    summary = finetune(cfg)
    assert summary['model_kwargs']['channels'] == [8, 8, 8, 8]
    assert summary['global_steps'] >= 1
    with pytest.raises(ValueError, match=r"model_kwargs \['res_drop_rate'\]"):
        finetune(tiny_config(dataset, tmp_path / 'kw2', res_drop_rate=0.1, model_kwargs=dict(res_drop_rate=0.2)))
    with pytest.raises(ValueError, match='sched multistep needs decay_milestones'):
        tiny_config(dataset, tmp_path / 'x', sched='multistep')
