"""The engine end to end on a generated ImageFolder: pairing, records, report, a real kill and --resume."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch
from helpers_train import PYTHON, REPO, subprocess_env
from study_helpers import make_image_folder, study_dict, write_spec

from timm_dropres.cli.study import main as study_main
from timm_dropres.study.data import resolve_splits, tensor_bundle
from timm_dropres.study.runner import StudyError, finetune_config, model_hook, run_data, run_one, run_study
from timm_dropres.study.spec import parse_study_spec, plan_runs
from timm_dropres.training.data import EpochSeededDataset, resolve_transforms
from timm_dropres.training.trainer import finetune


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('study-data') / 'imgs', seed=19)


def _records(out: Path):
    return sorted((out / 'results' / 'records').glob('*/*.json'))


def test_configurations_of_a_seed_share_initial_weights_and_augmented_batches(folder, tmp_path, one_torch_thread):
    """The plain timm model, the dropres one with residual dropout and a hook-placed hazard start identically."""
    spec = parse_study_spec(study_dict(folder, tmp_path, configs=dict(
        none={}, timm=dict(timm=True, drop_rate=0.1), residual=dict(res_drop_rate=0.1),
        after_add=dict(hazard='after_add', hazard_rate=0.1))))
    splits = resolve_splits(spec.data)
    _, eval_tf, dcfg = resolve_transforms(timm.create_model('preresnet20_cifar', num_classes=3), 3, img_size=20)
    bundle, *_ = tensor_bundle(splits, eval_tf, dcfg, spec.data)
    initial = {}
    for run in [r for r in plan_runs(spec) if r.seed == 0]:
        cfg = dataclasses.replace(finetune_config(spec, run, tmp_path / run.config.name), epochs=1, overwrite=True)
        hook = model_hook(run.arch, run.config)

        def capture(m, hook=hook, name=run.config.name):
            initial[name] = {k: v.clone() for k, v in m.state_dict().items()}
            return hook(m)

        finetune(cfg, data=bundle, model_hook=capture)
    assert initial['timm'] is not None and len(initial) == 4
    ref = initial['none']
    for name, sd in initial.items():
        assert sd.keys() == ref.keys(), name
        assert all(torch.equal(sd[k], ref[k]) for k in ref), f'{name}: initial weights differ from none'
    # augmentation: a function of (seed, epoch, index) only
    a, b, c = (EpochSeededDataset(bundle.train, bundle.train_transform, seed=s) for s in (0, 0, 1))
    assert torch.equal(a[3][0], b[3][0]) and not torch.equal(a[3][0], c[3][0])
    a.set_epoch(1)
    assert not torch.equal(a[3][0], b[3][0])


def test_study_records_report_and_report_only(folder, tmp_path, one_torch_thread):
    spec = parse_study_spec(study_dict(folder, tmp_path, select='best'))
    result = run_study(spec, log=lambda m: None)
    assert not result.failed and len(result.ran) == 4 and len(result.records) == 4
    rec = json.loads((tmp_path / 'results' / 'records' / 'p20' / 'residual_seed1.json').read_text())
    for key in ('top1', 'top5', 'nll', 'ece', 'train_nll', 'curve', 'data', 'versions', 'wall_s', 'cpu_s',
                'fingerprint', 'val'):
        assert rec[key] is not None, key
    assert rec['ece_bins'] == 15 and rec['test_images'] == 24 and rec['train_images'] == 54
    assert rec['resolved_res_pos'] == 'before_last_conv' and rec['dropout']['res_drop_rate'] == 0.1
    assert [p['epoch'] for p in rec['curve']] == [1, 2] and rec['select'] == 'best'
    assert rec['data']['tensors']['test'] and rec['data']['test_size'] == 24
    # the BN variance shift of the tested weights, on the (54) unaugmented training images
    assert rec['vs_images'] == 54 and 1.0 <= rec['vs_mean'] <= rec['vs_max']
    assert rec['vs_max'] == pytest.approx(max(rec['vs_layers'].values()), abs=1e-5)
    assert len(rec['vs_layers']) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in timm.create_model(
        rec['model'], **spec.architectures[0].model_kwargs).modules())
    # trainer folders are deleted once recorded; their parent stays (parallel workers create runs beside it)
    assert list((tmp_path / 'work' / 'p20').iterdir()) == [], 'trainer folders are deleted once recorded'
    # records exist: a second start without --resume refuses, with --resume runs nothing
    with pytest.raises(ValueError, match='pass --resume'):
        run_study(spec, log=lambda m: None)
    again = run_study(spec, resume=True, log=lambda m: None)
    assert again.ran == [] and len(again.skipped) == 4
    spec_file = write_spec(tmp_path / 'study.yaml', study_dict(folder, tmp_path, select='best'))
    assert study_main([str(spec_file), '--report-only']) == 0
    md = (tmp_path / 'results' / 'tiny.md').read_text()
    assert 'residual − none' in md and 'not adjusted for multiplicity' in md and 'smallest detectable effect' in md
    vs = [json.loads(f.read_text())['vs_mean'] for f in (tmp_path / 'results' / 'records' / 'p20').glob('residual_*')]
    assert '| VS mean | VS max |' in md and f'{sum(vs) / len(vs):.3f} ± ' in md
    assert (tmp_path / 'results' / 'tiny.png').stat().st_size > 1000
    lines = (tmp_path / 'results' / 'tiny.csv').read_text().splitlines()
    assert len(lines) == 1 + 3  # one comparison x (top-1, NLL, ECE)
    # the report is a function of the records: regenerating gives the same tables
    assert study_main([str(spec_file), '--report-only']) == 0
    assert (tmp_path / 'results' / 'tiny.md').read_text() == md
    # a record from another spec is refused, not mixed in
    other = write_spec(tmp_path / 'other.yaml', study_dict(folder, tmp_path, train=dict(
        epochs=3, batch_size=12, opt='sgd', lr=0.05, warmup_epochs=0, smoothing=0.0)))
    assert study_main([str(other), '--report-only']) == 2


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_finished_runs(folder, tmp_path):
    """A real ``dropres-study`` process killed mid-study; ``--resume`` finishes the rest and keeps the records."""
    spec = study_dict(folder, tmp_path, train=dict(epochs=6, batch_size=12, opt='sgd', lr=0.05, warmup_epochs=0,
                                                     smoothing=0.0))
    path = write_spec(tmp_path / 'study.yaml', spec)
    cmd = [PYTHON, '-m', 'timm_dropres.cli.study', str(path), '--threads', '1']
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not _records(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p: p.read_bytes() for p in _records(tmp_path)}
    assert 1 <= len(first) < 4, f'the kill should land mid-study; {len(first)} records'
    assert subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True).returncode == 2  # no --resume
    done = subprocess.run(cmd + ['--resume', '--workers', '2'], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(_records(tmp_path)) == 4
    assert all(p.read_bytes() == b for p, b in first.items()), 'a finished run was re-run'
    assert f'{4 - len(first)} runs to go, {len(first)} recorded' in done.stdout
    assert (tmp_path / 'results' / 'tiny.png').is_file() and (tmp_path / 'results' / 'tiny.md').is_file()


def test_pretraining_stage_feeds_every_run_and_is_reused(folder, tmp_path, one_torch_thread):
    """Transfer: the network is pretrained once through the same trainer; every run starts from those weights."""
    pre = dict(seed=0, data=dict(dataset=str(folder), classes=['disc', 'bars'], val_fraction=0.25, in_memory=True),
               train=dict(epochs=1, batch_size=12, opt='sgd', lr=0.05, warmup_epochs=0, smoothing=0.0))
    spec = parse_study_spec(study_dict(folder, tmp_path, seeds=1, pretrain=pre,
                                       data=dict(dataset=str(folder), val_fraction=0.25, in_memory=True,
                                                 train_subset=30, subset_per_seed=True)))
    logs = []
    result = run_study(spec, log=logs.append)
    assert not result.failed and len(result.records) == 2
    weights = tmp_path / 'work' / 'pretrained' / 'p20.safetensors'
    pre_rec = json.loads((tmp_path / 'results' / 'pretraining' / 'p20.json').read_text())
    assert pre_rec['classes'] == ['disc', 'bars'] and weights.is_file()
    shas = {r['pretrained_file_sha256'] for r in result.records}
    assert shas == {pre_rec['sha256']}
    assert all(r['data']['train_size'] == 30 for r in result.records)
    # a second study over the same pretraining reuses the weights instead of training them again
    spec2 = dataclasses.replace(spec, seeds=(0, 1))
    logs.clear()
    recs = run_study(spec2, resume=True, log=logs.append).records
    assert len({r['data']['train_files'] for r in recs}) == 2, 'subset_per_seed: each seed draws its own subset'
    assert len({r['data']['train_files'] for r in recs if r['seed'] == 1}) == 1, '...the same for every config'
    assert any('(recorded)' in m for m in logs) and not any(m.startswith('pretrained p20: validation') for m in logs)


def test_a_run_killed_mid_training_continues_from_its_checkpoint(folder, tmp_path, one_torch_thread):
    spec = parse_study_spec(study_dict(folder, tmp_path, seeds=1))
    run = plan_runs(spec)[1]
    out = tmp_path / 'work' / run.arch.name / f'{run.config.name}_seed{run.seed}'
    cfg = finetune_config(spec, run, out)
    bundle, *_ = run_data(spec.data, cfg, run.arch)
    # what a kill after step 3 leaves behind: the trainer's folder with a checkpoint, and no record
    finetune(dataclasses.replace(cfg, stop_after_steps=3, overwrite=True), data=bundle,
             model_hook=model_hook(run.arch, run.config))
    rec = run_one(spec, run, log=lambda m: None)
    assert rec['resumed_at_steps'] == [3] and rec['steps'] == 8 and not out.exists()
    fresh = parse_study_spec(study_dict(folder, tmp_path / 'b', seeds=1))
    again = run_one(fresh, plan_runs(fresh)[1], log=lambda m: None)
    assert again['resumed_at_steps'] == [] and again['top1'] == rec['top1'] and again['nll'] == rec['nll']


def test_the_residual_position_of_resnet_and_family_twins_is_recorded():
    """A family twin (models/families.py) has one residual position, after the last BN; asking it must not fail
    after the run has trained (the record is written last)."""
    from timm_dropres.study.runner import _resolved_position
    from timm_dropres.study.spec import ConfigSpec

    residual = ConfigSpec(name='residual', res_drop_rate=0.1)
    for arch in ('test_byobnet_dropres', 'test_resnet_dropres'):
        model = timm.create_model(arch, res_drop_rate=0.1)
        assert _resolved_position(model, residual) == 'after_last_bn', arch
    assert _resolved_position(timm.create_model('test_resnet'), ConfigSpec(name='none')) is None


def test_a_study_that_cannot_run_says_why_for_every_pair_before_anything_runs(tmp_path, capsys):
    """Unknown model names, a position a family refuses and an unknown optimizer are found up front (also by
    --dry-run), every bad pair listed, and no folder is written."""
    spec = study_dict(tmp_path / 'no-data', tmp_path, configs=dict(none={}, late=dict(
        res_drop_rate=0.1, res_drop_pos='before_last_conv')), architectures=[
        dict(name='typo', model='test_resnet_dropes', img_size=20),
        dict(name='effnet', model='efficientnet_b0_dropres', img_size=32)], comparisons=dict(main=[['late', 'none']]))
    with pytest.raises(StudyError) as e:
        run_study(parse_study_spec(spec))
    msg = str(e.value)
    assert msg.startswith('3 architecture/configuration pair(s) cannot run')
    assert "typo / none: unknown model 'test_resnet_dropes'; did you mean one of ['test_resnet_dropres'" in msg
    assert 'typo / late' in msg and "effnet / late: res_drop_pos must be one of ['auto', 'after_last_bn']" in msg
    assert 'effnet / none' not in msg and not (tmp_path / 'results').exists() and not (tmp_path / 'work').exists()
    bad_opt = write_spec(tmp_path / 'opt.yaml', study_dict(tmp_path / 'no-data', tmp_path, train=dict(
        epochs=1, batch_size=8, opt='adamx')))
    assert study_main([str(bad_opt), '--dry-run']) == 2
    assert 'did you mean adamax' in capsys.readouterr().err and not (tmp_path / 'results').exists()


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc; zombies left out)."""
    pids = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[0] != 'Z' and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _wait_gone(sid: int, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while _session_pids(sid) and time.time() < deadline:
        time.sleep(0.1)
    return _session_pids(sid)


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads /proc to find the workers')
def test_stopping_a_study_with_workers_stops_its_workers(folder, tmp_path):
    """SIGTERM to the study process (not its group) ends it with a one-line message and stops both workers at
    once, instead of letting them train the queue; after SIGKILL the workers die with it (no orphans holding
    run folders). ``--resume`` then finishes the study."""
    spec = study_dict(folder, tmp_path, seeds=3, train=dict(epochs=40, batch_size=12, opt='sgd', lr=0.05,
                                                              warmup_epochs=0, smoothing=0.0))  # runs of seconds
    path = write_spec(tmp_path / 'study.yaml', spec)
    cmd = [PYTHON, '-m', 'timm_dropres.cli.study', str(path), '--threads', '1', '--workers', '2']
    for sig, resume in ((signal.SIGTERM, []), (signal.SIGKILL, ['--resume'])):
        proc = subprocess.Popen(cmd + resume, cwd=REPO, env=subprocess_env(), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240  # until both workers are up, then a few seconds into their runs
        while len(_session_pids(proc.pid)) < 3 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(4)
        pids = _session_pids(proc.pid)
        if len(pids) < 3:
            proc.kill()
            raise AssertionError(f'the study and its two workers should be running: {pids}, {proc.communicate()}')
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
        assert _wait_gone(proc.pid, 20) == [], f'workers left running after {sig.name}'
        if sig == signal.SIGTERM:
            assert proc.returncode == 130 and 'dropres-study: interrupted' in err and 'Traceback' not in err, err
    recorded = len(_records(tmp_path))
    assert recorded < 6, 'the queue should not have been trained after the stop'
    done = subprocess.run(cmd + ['--resume'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(_records(tmp_path)) == 6
