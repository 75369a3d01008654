"""dropres-finetune as a drop-in for timm's train.py: timm's flag names reach the model or the loop, flags are
never abbreviated, help shows each default once, the run folder holds what timm and transformers read."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, Dict, List

import pytest
import timm
import torch
import yaml
from accelerate.state import AcceleratorState
from helpers_train import make_image_folder, tiny_config
from safetensors.torch import save_file
from timm.layers import DropBlock2d, DropPath
from torch.utils.data import Dataset

from timm_dropres.cli._config_args import build_parser, parse_checked, parse_config
from timm_dropres.cli.finetune import main as finetune_main
from timm_dropres.models.reference import ModelRef
from timm_dropres.recipes import RECIPES_DIR, find_recipe, list_recipes
from timm_dropres.training.build import build_model, resolve_model, weights_origin
from timm_dropres.training.config import FinetuneConfig, ValidateConfig
from timm_dropres.training.data import DataBundle, resolve_data
from timm_dropres.training.progress import progress_bar
from timm_dropres.training.trainer import finetune

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _parse(*argv: str) -> FinetuneConfig:
    """As ``dropres-finetune`` parses: the config, then the library's model checks, both as usage errors."""
    return parse_checked(FinetuneConfig, list(argv), 'test', 'dropres-finetune', resolve_model, recipes=True)[0]


# ----------------------------------------------------------------------------------------------- flags
def test_timm_flag_names_set_the_same_options(tmp_path):
    ckpt = tmp_path / 'w.safetensors'
    save_file(timm.create_model('test_resnet_dropres', num_classes=3).state_dict(), ckpt)
    cfg = _parse('--model', 'test_resnet_dropres', '-b', '8', '-j', '0', '-vb', '6', '--drop', '0.2',
                 '--drop-path', '0.1', '--drop-block', '0.05', '--model-ema', '--model-ema-decay', '0.99',
                 '--torchcompile', '--initial-checkpoint', str(ckpt), '--pretrained-path', str(ckpt),
                 '--checkpoint-hist', '3', '--log-interval', '5', '--amp')
    assert (cfg.batch_size, cfg.num_workers, cfg.eval_batch_size) == (8, 0, 6)
    assert (cfg.drop_rate, cfg.drop_path_rate, cfg.drop_block_rate) == (0.2, 0.1, 0.05)
    assert cfg.ema and cfg.ema_decay == 0.99 and cfg.torchcompile == 'inductor'
    assert cfg.initial_checkpoint == cfg.pretrained_file == str(ckpt)
    assert (cfg.keep_checkpoints, cfg.log_every, cfg.mixed_precision) == (3, 5, 'fp16')
    assert _parse('--workers', '3', '--grad-checkpointing').num_workers == 3
    assert _parse('--torchcompile', 'eager').torchcompile == 'eager'
    # timm's --amp / --amp-dtype, in either order, and --amp keeps a dtype already chosen
    assert _parse('--amp', '--amp-dtype', 'bfloat16').mixed_precision == 'bf16'
    assert _parse('--amp-dtype', 'bfloat16', '--amp').mixed_precision == 'bf16'
    assert _parse('--mixed-precision', 'bf16', '--amp').mixed_precision == 'bf16'
    assert parse_config(ValidateConfig, ['--model', 'resnet18', '-b', '5', '-j', '1', '--amp'], 'v').mixed_precision \
        == 'fp16'


@pytest.mark.parametrize('argv,needle', [
    (['--warmup', '1'], 'unrecognized arguments: --warmup'),  # was an ambiguous prefix
    (['--drop-r', '0.1'], 'unrecognized arguments: --drop-r'),  # prefixes are never expanded
    (['--torchcompile', 'nosuchbackend'], "'nosuchbackend' is not a torch.compile backend; valid: ["),
    (['--torchcompile', '--grad-checkpointing'], '--torchcompile and --grad-checkpointing together fail'),
    (['--initial-checkpoint', 'missing.safetensors'], '--initial-checkpoint missing.safetensors does not exist'),
    (['--drop-path', '1.5'], 'drop_path_rate'),
])
def test_bad_or_abbreviated_flags_fail_naming_them(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_help_prints_each_default_once(capsys):
    for cls in (FinetuneConfig, ValidateConfig):
        options = re.split(r'\n  (?=-)', build_parser(cls, 'test', recipes=cls is FinetuneConfig).format_help())
        assert len(options) > 20
        for text in options:
            assert text.lower().count('default') <= 1, text
    with pytest.raises(SystemExit):
        finetune_main(['--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert "(default: the model's) (default" not in out
    assert "timm's own after-pool dropout (default: the model's)" in out
    assert '--batch-size BATCH_SIZE, -b BATCH_SIZE images per process per micro-step (default: 64)' in out
    assert '--channels-last, --no-channels-last use channels_last memory format' in out
    assert '(default: False)' in out and '--dataset DATASET ImageFolder root' in out and '(default: )' not in out


def test_yaml_accepts_timm_names_once(tmp_path):
    (tmp_path / 'a.yaml').write_text('model: test_resnet_dropres\ndrop: 0.2\nmodel_ema: true\nworkers: 0\n')
    cfg = _parse('--config', str(tmp_path / 'a.yaml'))
    assert (cfg.drop_rate, cfg.ema, cfg.num_workers) == (0.2, True, 0)
    (tmp_path / 'b.yaml').write_text('drop: 0.2\ndrop_rate: 0.3\n')
    with pytest.raises(SystemExit):
        _parse('--config', str(tmp_path / 'b.yaml'))


# ----------------------------------------------------------------------------------------------- recipes
def test_config_finds_shipped_recipes_by_name_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: as after `pip install timm-dropres`
    names = list_recipes()
    assert {'fashion_mnist_resnet18', 'pets_resnet50', 'paper/preresnet110_cifar10', 'accelerate/multi_gpu'} <= \
        set(names)
    for spelling in ('fashion_mnist_resnet18', 'fashion_mnist_resnet18.yaml', 'configs/fashion_mnist_resnet18.yaml'):
        assert find_recipe(spelling) == RECIPES_DIR / 'fashion_mnist_resnet18.yaml'
    cfg = _parse('--config', 'configs/paper/preresnet110_cifar10.yaml', '-b', '64')
    assert cfg.model == 'preresnet110_cifar_dropres' and cfg.batch_size == 64 and cfg.pad_crop == 4
    with pytest.raises(FileNotFoundError, match=r"shipped recipes: \['ablation_fmnist'"):
        find_recipe('../pyproject')
    with pytest.raises(SystemExit):
        _parse('--config', 'no_such_recipe')
    assert 'no such file, and no shipped recipe of that name' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _parse('--list-configs')
    assert e.value.code == 0
    listed = capsys.readouterr().out.split()
    assert 'fashion_mnist_resnet18' in listed and str(RECIPES_DIR / 'pets_resnet50.yaml') in listed


def test_repo_configs_folder_is_the_shipped_one():
    repo_configs = Path(__file__).resolve().parents[2] / 'configs'
    assert repo_configs.resolve() == RECIPES_DIR


# ----------------------------------------------------------------------------------------------- reaching the model
def test_model_flags_reach_the_model(tmp_path):
    cfg = tiny_config('unused', tmp_path, drop_path_rate=0.1, drop_block_rate=0.05, grad_checkpointing=True)
    model, kwargs = build_model(cfg, resolve_model(cfg), num_classes=3, in_chans=3)
    assert kwargs['drop_path_rate'] == 0.1 and kwargs['drop_block_rate'] == 0.05
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) == pytest.approx(0.1)
    assert any(isinstance(m, DropBlock2d) for m in model.modules())
    assert model.grad_checkpointing is True
    # timm's --initial-checkpoint: every weight of the file, strictly; a saved folder works too
    src = timm.create_model('test_resnet_dropres', num_classes=3)
    save_file(src.state_dict(), tmp_path / 'init.safetensors')
    (tmp_path / 'folder').mkdir()
    save_file(src.state_dict(), tmp_path / 'folder' / 'model.safetensors')
    for path in (tmp_path / 'init.safetensors', tmp_path / 'folder'):
        cfg = tiny_config('unused', tmp_path, initial_checkpoint=str(path))
        model, _ = build_model(cfg, resolve_model(cfg), 3, 3)
        got, want = model.state_dict(), src.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match='cannot be loaded strictly into test_resnet_dropres'):
        cfg = tiny_config('unused', tmp_path, initial_checkpoint=str(tmp_path / 'init.safetensors'))
        build_model(cfg, resolve_model(cfg), 5, 3)


def test_weights_origin_only_when_training_started_from_weights(tmp_path):
    model = timm.create_model('test_resnet_dropres', num_classes=3)
    ref = ModelRef.parse('test_resnet_dropres')
    assert weights_origin(model, tiny_config('x', tmp_path), ref) is None  # from scratch: no provenance
    assert weights_origin(model, tiny_config('x', tmp_path, pretrained=True), ref) == dict(
        finetuned_from='test_resnet_dropres', license='apache-2.0')  # the starting weights' license carries over
    save_file(model.state_dict(), tmp_path / 'w.safetensors')  # a damaged file is refused before the run starts
    assert weights_origin(model, tiny_config('x', tmp_path, pretrained_file=str(tmp_path / 'w.safetensors')), ref) == \
        dict(finetuned_from='w.safetensors', license=None)  # a local file: its license is unknown


def test_progress_bar_draws_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, enabled, draws in ((Terminal(), None, True), (io.StringIO(), None, False),
                                   (io.StringIO(), True, True), (Terminal(), False, False)):
        bar = progress_bar(total=5, desc='epoch 1/1', enabled=enabled, file=stream)
        for _ in range(5):
            bar.update(1)
        bar.close()
        assert ('epoch 1/1' in stream.getvalue()) is draws, (type(stream).__name__, enabled)


# ----------------------------------------------------------------------------------------------- reaching the loop
class _WorkerRecordingDataset(Dataset):
    """Wraps a dataset; each data-loader worker that loads a sample leaves a file named after its id."""

    def __init__(self, ds: Dataset, folder: Path) -> None:
        self.ds, self.folder = ds, folder

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        info = torch.utils.data.get_worker_info()
        (self.folder / f'worker{info.id if info is not None else "-main"}').touch()
        return self.ds[i]


@pytest.fixture(scope='module')
def timm_flag_run(tmp_path_factory) -> Dict[str, Any]:
    """One tiny run with timm's flags for the loop: -b, -j, --torchcompile, --model-ema, --amp-dtype."""
    root = tmp_path_factory.mktemp('dropin')
    data = resolve_data(str(make_image_folder(root / 'data', n_train=8, n_val=4)), seed=0)
    (root / 'workers').mkdir()
    data = DataBundle(_WorkerRecordingDataset(data.train, root / 'workers'), data.val, data.label_names,
                      data.in_chans, data.description)
    cfg = _parse('--model', 'test_resnet_dropres', '--dataset', 'unused', '--output-dir', str(root / 'run'),
                 '-b', '6', '-j', '1', '--torchcompile', 'eager', '--model-ema', '--amp-dtype', 'bfloat16',
                 '--epochs', '2', '--img-size', '32', '--cpu', '--warmup-epochs', '0', '--lr', '3e-3')
    compiled: List[str] = []
    real_compile = torch.compile

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        compiled.append(kwargs.get('backend'))
        return real_compile(model, *args, **kwargs)

    old_umask = os.umask(0o027)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setattr(torch, 'compile', spy)
    try:
        summary = finetune(cfg, data=data)
    finally:
        mp.undo()
        os.umask(old_umask)
        torch.set_num_threads(n)
        # accelerate keeps one process-wide state; bf16 here would refuse later runs' 'no' (as its own
        # AccelerateTestCase does between tests)
        AcceleratorState._reset_state(reset_partial_state=True)
    return dict(root=root, out=root / 'run', summary=summary, compiled=compiled, cfg=cfg)


def test_timm_flags_reach_the_loop(timm_flag_run):
    s, root = timm_flag_run['summary'], timm_flag_run['root']
    assert s['global_steps'] == 2 * (24 // 6)  # -b 6: 24 images, 4 steps an epoch
    assert sorted(p.name for p in (root / 'workers').iterdir()) == ['worker0']  # -j 1: loaded in one worker
    assert timm_flag_run['compiled'] == ['eager']  # --torchcompile eager
    assert s['last_ema'] is not None and 'ema_top1' in s['history'][0]  # --model-ema
    assert s['mixed_precision'] == 'bf16'  # --amp-dtype bfloat16
    # torch.compile wraps the forward only: checkpoints and exports keep the plain parameter names
    best = timm.create_model(f'local-dir:{timm_flag_run["out"] / "best"}', pretrained=True)
    assert best.num_classes == 3


def test_run_folder_has_args_yaml_and_summary_csv(timm_flag_run):
    out, s = timm_flag_run['out'], timm_flag_run['summary']
    args = yaml.safe_load((out / 'args.yaml').read_text())
    assert args == json.loads(json.dumps(s['config'])) and args['batch_size'] == 6 and args['torchcompile'] == 'eager'
    rows = list(csv.DictReader((out / 'summary.csv').open()))
    assert [int(r['epoch']) for r in rows] == [1, 2]
    assert [float(r['top1']) for r in rows] == [h['top1'] for h in s['history']]
    assert {'train_loss', 'lr', 'top5', 'loss', 'ema_top1'} <= set(rows[0])


def test_exported_folders_respect_the_umask(timm_flag_run):
    """Under umask 027: folders 0750 and files 0640 (was 0700 / 0600 from mkdtemp and safetensors)."""
    for name in ('best', 'last'):
        folder = timm_flag_run['out'] / name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == \
            {'config.json': 0o640, 'model.safetensors': 0o640}


def test_exported_cfg_describes_the_trained_model(timm_flag_run):
    """32 px from scratch: config.json says 32 px, the run's mean/std/crop, and nothing of test_resnet's tag."""
    cfg = json.loads((timm_flag_run['out'] / 'best' / 'config.json').read_text())
    pcfg = cfg['pretrained_cfg']
    assert pcfg['input_size'] == [3, 32, 32] and pcfg['crop_mode'] == 'center'
    assert {'interpolation', 'mean', 'std', 'crop_pct', 'num_classes', 'first_conv', 'classifier'} <= set(pcfg)
    for stale in ('tag', 'test_input_size', 'test_crop_pct', 'paper_ids', 'paper_name', 'origin_url', 'license'):
        assert stale not in pcfg, stale
    assert 'finetuned_from' not in cfg  # trained from scratch
    assert 'num_classes' not in cfg['model_args'] and cfg['num_classes'] == 3  # transformers adds num_classes
    model = timm.create_model(f'local-dir:{timm_flag_run["out"] / "best"}', pretrained=True)
    # what timm's validate.py resolves (it asks for the test size when there is one): the trained 32 px
    for use_test_size in (False, True):
        assert timm.data.resolve_data_config({}, model=model, use_test_size=use_test_size)['input_size'] == \
            (3, 32, 32)


def test_trained_folder_loads_in_transformers(timm_flag_run):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = timm_flag_run['out'] / 'best'
    hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    assert hf.config.id2label == {0: 'circle', 1: 'square', 2: 'stripes'}
    assert AutoImageProcessor.from_pretrained(str(folder)).data_config['input_size'] == (3, 32, 32)
    ref = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # equal up to rounding: transformers' weights sit at other alignments (other kernels)
        torch.testing.assert_close(hf(x).logits, ref(x), rtol=0, atol=1e-6)


def test_cli_log_to_a_file_has_no_progress_bars(tmp_path, capfd, caplog):
    """stderr is not a terminal (a log file, a pipe): per-epoch log lines, no bar refreshes."""
    caplog.set_level(logging.INFO, logger='timm_dropres')  # other tests (the benchmarks) may have raised it
    data = make_image_folder(tmp_path / 'data', n_train=4, n_val=2)
    rc = finetune_main(['--model', 'test_resnet_dropres', '--dataset', str(data), '--output-dir', str(tmp_path / 'r'),
                        '-b', '4', '-j', '0', '--img-size', '32', '--epochs', '1', '--cpu'])
    err = capfd.readouterr().err
    assert rc == 0 and 'epoch 1/1  train loss' in caplog.text, err[-3000:]
    assert not re.search(r'epoch 1/1:|\d+/\d+ \[|it/s', err), err[-2000:]
