"""The placement ablation: hazards sit where they claim, significance marking, and the committed report re-made."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from timm_dropres import RES_DROP_POSITIONS, ResidualDropout, residual_blocks
from timm_dropres.cli import ablate as cli
from timm_dropres.research import ablation, report
from timm_dropres.research.ablation import CONFIGS, ArchSpec

# tiny models: one intra-op thread is fastest, and two threads spin on a busy 2-core box
pytestmark = pytest.mark.usefixtures('one_torch_thread')

ROOT = Path(__file__).resolve().parents[2]
# tiny versions of the two committed architectures (same layouts, width 8)
POST = ArchSpec('post', 'resnet18_dropres', dict(channels=[8, 8, 8, 8], stem_type='deep', stem_width=4), 2)
PRE = ArchSpec('pre', 'resnetv2_18_dropres', dict(channels=[8, 8, 8, 8], stem_chs=8), 2)


def _model(arch: ArchSpec, config: str, p: float = 0.5) -> nn.Module:
    return ablation.build_model(arch, CONFIGS[config], res_drop_rate=p, head_drop_rate=p).train()


# ---------------------------------------------------------------------------------------------- placements

@pytest.mark.parametrize('arch', [POST, PRE], ids=['post', 'pre'])
def test_before_every_bn_drops_the_input_of_every_branch_bn_only(arch: ArchSpec) -> None:
    model = _model(arch, 'before_every_bn')
    branch_bns = {id(m) for m in model.modules() if hasattr(m, 'ablation_drop')}
    seen: dict = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # registered after the ablation hook -> sees its output
            seen[name] = (id(module) in branch_bns, (args[0] == 0).float().mean().item())
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(record(name))
    model(torch.randn(8, 1, 28, 28))
    blocks = list(residual_blocks(model))
    assert len(branch_bns) == 2 * len(blocks) == 16  # BasicBlock: two BN per branch, 8 blocks
    for name, (in_branch, zeros) in seen.items():
        if in_branch:
            assert 0.4 < zeros < 0.6, f'{name}: {zeros:.2f} of its input zeroed, expected ~0.5'
        else:
            assert zeros < 0.05, f'{name} is outside the branches but {zeros:.2f} of its input is zero'
    assert not any(isinstance(m, ResidualDropout) and m.p > 0 for m in model.modules())
    seen.clear()
    model.eval()(torch.randn(8, 1, 28, 28))
    assert all(zeros < 0.05 for in_branch, zeros in seen.values() if in_branch)  # eval: no dropout


@pytest.mark.parametrize('arch', [POST, PRE], ids=['post', 'pre'])
def test_after_add_drops_the_block_output(arch: ArchSpec) -> None:
    model = _model(arch, 'after_add', p=0.5)
    _, block = list(residual_blocks(model))[2]
    x = torch.randn(8, *_block_input_shape(model, block))
    torch.manual_seed(1)
    dropped = block(x)
    block.ablation_drop.eval()  # switch only the hazard off; BN stays in train mode (batch statistics)
    ref = block(x)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], ref[kept] * 2.0)  # inverted dropout scale 1 / (1 - p)
    live = ref != 0
    frac = (~kept & live).sum().item() / live.sum().item()
    assert 0.4 < frac < 0.6
    if arch is PRE:  # pre-activation: x + shortcut with no ReLU, so only the dropout makes zeros
        assert live.float().mean().item() == 1.0


def _block_input_shape(model: nn.Module, block: nn.Module) -> tuple:
    shapes = []
    h = block.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[1:])))
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    h.remove()
    return shapes[0]


@pytest.mark.parametrize('arch', [POST, PRE], ids=['post', 'pre'])
def test_head_after_pool_drops_pooled_features_and_nothing_before(arch: ArchSpec) -> None:
    model = _model(arch, 'head_after_pool', p=0.5)
    assert model.head_drop.p == 0.0  # the before-pool dropout is off in this configuration
    fc = model.fc if hasattr(model, 'fc') else model.head.fc
    pool = model.global_pool if hasattr(model, 'global_pool') and not isinstance(model, timm.models.ResNetV2) \
        else model.head.global_pool
    got: dict = {}
    pool.register_forward_pre_hook(lambda m, a: got.__setitem__('map', a[0]))
    fc.register_forward_pre_hook(lambda m, a: got.__setitem__('fc_in', a[0]))
    x = torch.randn(8, 1, 28, 28)
    torch.manual_seed(2)
    model(x)
    feature_map, dropped = got['map'], got['fc_in'].flatten(1)
    pooled = feature_map.mean((2, 3))
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], pooled[kept] * 2.0)
    live = pooled != 0
    assert 0.3 < (~kept & live).sum().item() / live.sum().item() < 0.7


def test_default_and_public_positions_use_the_core_modules() -> None:
    model = _model(POST, 'default', p=0.2)
    assert timm_dropres_positions(model) == {'after_last_bn'}
    assert model.head_drop.p == 0.2
    assert not any(hasattr(m, 'ablation_drop') for m in model.modules())
    assert timm_dropres_positions(_model(POST, 'before_last_conv')) == {'before_last_conv'}
    assert timm_dropres_positions(_model(PRE, 'after_last_bn')) == {'before_last_conv'}
    # the hazards stay out of the public vocabulary
    assert 'before_every_bn' not in RES_DROP_POSITIONS and 'after_add' not in RES_DROP_POSITIONS
    with pytest.raises(ValueError, match='res_drop_pos must be one of'):
        timm.create_model('resnet18_dropres', res_drop_pos='after_add')


def timm_dropres_positions(model: nn.Module) -> set:
    return {b.res_drop_pos for _, b in residual_blocks(model) if b.res_drop.p > 0}


def test_configs_for_skips_the_duplicate_preact_position() -> None:
    names, skipped = ablation.configs_for(PRE, tuple(CONFIGS))
    assert 'residual' in names and set(skipped) == {'after_last_bn', 'before_last_conv'}  # one position only
    names, skipped = ablation.configs_for(PRE, ('none', 'after_last_bn', 'before_last_conv'))
    assert names == ['none', 'before_last_conv'] and set(skipped) == {'after_last_bn'}  # named after the position
    names, skipped = ablation.configs_for(POST, tuple(CONFIGS))
    assert 'after_last_bn' in skipped and names == [c for c in CONFIGS if c != 'after_last_bn']
    names, skipped = ablation.configs_for(POST, ('none', 'default@0.1', 'residual@0.1', 'after_last_bn@0.2'))
    assert skipped == {}  # different rates are different networks


def test_small_input_stem_gives_a_2x2_final_map() -> None:
    for arch in (POST, PRE):
        model = _model(arch, 'none').eval()
        assert model.forward_features(torch.randn(1, 1, 28, 28)).shape[-2:] == (2, 2)
    with pytest.raises(ValueError, match='stem_stride must be 1 or 2'):
        ablation.small_input_stem(timm.create_model('resnet18_dropres'), 3)


# ---------------------------------------------------------------------------------------------- report

def test_summarize_and_tables_on_synthetic_records() -> None:
    def rec(config: str, seed: int, top1: float, vs: float = 1.0) -> dict:
        return dict(arch='a', config=config, seed=seed, top1=top1, nll=0.5 - 0.01 * top1 / 90, vs_mean=vs,
                    vs_max=vs, resolved_res_pos=None)
    noise = [0.0, 0.3, -0.2, 0.1, -0.1]
    records = [rec('none', s, 90.0 + s) for s in range(5)]
    records += [rec('residual', s, 90.0 + s + noise[s]) for s in range(5)]                 # centred on 0
    records += [rec('before_last_conv', s, 88.0 + s + noise[s] / 4, vs=1.3) for s in range(5)]  # -2 every seed
    rows = {r['config']: r for r in report.summarize(records, ablation.CONFIG_ORDER)}
    assert rows['none']['top1_vs_none'] is None
    assert list(rows) == ['none', 'residual', 'before_last_conv']  # report order
    res, wrong = rows['residual']['top1_vs_none'], rows['before_last_conv']['top1_vs_none']
    assert res.significant is False and res.n == 5 and res.diff == pytest.approx(0.02)
    assert wrong.significant is True and wrong.diff == pytest.approx(-1.995) and wrong.wins == 0
    assert res.p_holm >= res.p and wrong.p_holm == pytest.approx(2 * wrong.p)  # Holm over the two
    md = report.markdown_tables(records, ablation.CONFIG_ORDER)
    assert '| residual | 5 | 92.02 ± 1.53 | +0.02 [' in md  # values 90, 91.3, 91.8, 93.1, 93.9: sd 1.529
    assert '| a | residual − before_last_conv | 5 | +2.01 [' in md  # 2 + 0.75 x mean noise = 2.015


# ---------------------------------------------------------------------------------------------- spec + re-analysis

def test_load_spec_reads_the_committed_config_and_rejects_unknown_keys(tmp_path: Path) -> None:
    spec = ablation.load_spec(ROOT / 'configs' / 'ablation_fmnist.yaml')
    assert len(spec.seeds) >= 3 and {a.model for a in spec.architectures} >= {'resnet18_dropres',
                                                                             'resnetv2_18_dropres'}
    bad = tmp_path / 'bad.yaml'
    bad.write_text('architectures: []\nschedule: {epochs: 1, lrr: 0.1}\n')
    with pytest.raises(ValueError, match=r"unknown keys \['lrr'\]"):
        ablation.load_spec(bad)
    bad.write_text('architectures: [{name: a, model: resnet18_dropres}]\nconfigs: [none, everywhere]\n')
    with pytest.raises(ValueError, match=r"unknown configurations \['everywhere'\]"):
        ablation.load_spec(bad)
    bad.write_text('architectures: []\nschedule: {epochs: 1, lr: 0.1, lr: 0.3}\n')  # the last used to win
    with pytest.raises(ValueError, match=r"the key 'lr' is given twice \(first on line 2\).*\(line 2\)"):
        ablation.load_spec(bad)


def test_cli_report_only_rewrites_the_report_and_keeps_the_analysis(tmp_path: Path) -> None:
    spec = tmp_path / 'spec.yaml'
    spec.write_text(json.dumps(dict(
        architectures=[dict(name='post', model='resnet18_dropres', stem_stride=2,
                            model_kwargs=dict(channels=[8, 8, 8, 8], stem_type='deep', stem_width=4))],
        configs=['none', 'after_add'], seeds=[0, 1])))
    runs = tmp_path / 'runs' / 'post'
    runs.mkdir(parents=True)
    for config, top1 in (('none', 90.0), ('after_add', 80.0)):
        for seed in (0, 1):
            (runs / f'{config}_seed{seed}.json').write_text(json.dumps(dict(
                arch='post', config=config, seed=seed, top1=top1 + seed, nll=0.3, vs_mean=1.1, vs_max=1.5,
                wall_s=1.0, threads=1, resolved_res_pos=None)))
    (tmp_path / 'ablation.md').write_text(f'old\n{report.KEEP_MARKER}\n## Conclusion\nkept text\n')
    argv = ['--config', str(spec), '--out-dir', str(tmp_path), '--runs-dir', str(tmp_path / 'runs'), '--report-only']
    assert cli.main(argv) == 0
    md = (tmp_path / 'ablation.md').read_text()
    assert md.startswith('# Dropout-placement ablation') and 'old' not in md.split(report.KEEP_MARKER)[0]
    assert '| after_add | 2 | 80.50 ± 0.71 | -10.00 (identical on every seed: no test) |' in md
    assert md.endswith('## Conclusion\nkept text\n')
    assert (tmp_path / 'ablation.png').stat().st_size > 10_000
    assert cli.main(['--config', str(spec), '--out-dir', str(tmp_path / 'empty'), '--report-only']) == 1


def test_rate_variants_parse_and_validate() -> None:
    c = ablation.get_config('default@0.1')
    assert (c.name, c.residual, c.head, c.rate) == ('default@0.1', 'auto', 'before_pool', 0.1)
    assert ablation.get_config('none') is CONFIGS['none']
    for bad, msg in (('default@x', 'must be a number'), ('sideways@0.1', 'unknown configuration'),
                     ('default@1.0', r'must be in \[0, 1\)')):
        with pytest.raises(ValueError, match=msg):
            ablation.get_config(bad)
    model = ablation.build_model(POST, c, res_drop_rate=0.1, head_drop_rate=0.1)
    assert timm_dropres_positions(model) == {'after_last_bn'} and model.head_drop.p == 0.1
    names, skipped = ablation.configs_for(PRE, ('before_last_conv@0.1', 'after_last_bn@0.1'))
    assert names == ['before_last_conv@0.1'] and set(skipped) == {'after_last_bn@0.1'}


def test_cli_refuses_to_train_and_names_what_replaced_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(['--config', 'ablation_fmnist', '--out-dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'no longer trains' in err and 'dropres-study configs/studies/' in err
    assert '--report-only' in err and not (tmp_path / 'out').exists()


def test_make_ablate_reproduces_the_committed_underfit_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make ablate``'s command re-makes docs/results/underfit from its committed run JSONs, training nothing: the
    csv is byte-identical, and so is the md once its recorded command names the same output folder."""
    committed = ROOT / 'docs' / 'results' / 'underfit'
    make = (ROOT / 'Makefile').read_text()
    recipe = make[make.index('\nablate:'):].split('\n\n')[0]
    argv = shlex.split(recipe.split('scripts/ablate.py', 1)[1].replace('\\\n', ' '))
    assert '--report-only' in argv and argv[argv.index('--out-dir') + 1] == 'docs/results/underfit'
    argv[argv.index('--out-dir') + 1] = str(tmp_path)
    shutil.copy(committed / 'underfit.md', tmp_path / 'underfit.md')  # the hand-written analysis below the marker
    monkeypatch.chdir(ROOT)  # the Makefile's relative paths
    assert cli.main(argv) == 0
    assert (tmp_path / 'underfit.csv').read_bytes() == (committed / 'underfit.csv').read_bytes()
    old = (committed / 'underfit.md').read_text()
    assert '--out-dir docs/results/underfit --runs-dir' in old
    assert (tmp_path / 'underfit.md').read_text() == old.replace(
        '--out-dir docs/results/underfit --runs-dir', f'--out-dir {shlex.quote(str(tmp_path))} --runs-dir', 1)
    assert '| after_add | 5 | 65.21 ± 2.85 |' in old  # the tables are there
    files = list((committed / 'runs').glob('*/*.json'))
    assert len(ablation.read_records(committed / 'runs')) == len(files) == 95 and '- runs: 95,' in old
