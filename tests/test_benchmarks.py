"""The benchmark harness measures what it claims, and every benchmark script still runs (--smoke)."""
from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import timm
import torch

import timm_dropres  # noqa: F401
from benchmarks import (
    ceiling,
    compile_check,
    dropout_impl,
    gpu_summary,
    inference,
    run_all,
    study_engine,
    trainer,
    training,
)
from benchmarks import common as C


@pytest.fixture(autouse=True)
def _restore_threads():
    """The --smoke runs use one torch thread (steadier on a loaded machine); later tests get theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_stat_and_paired_ratio():
    s = C.Stat.of([3.0, 1.0, 2.0])
    assert (s.median, s.lo, s.hi) == (2.0, 1.0, 3.0)
    assert (s.ci_lo, s.ci_hi, s.ci_level) == (1.0, 3.0, 0.75)  # 3 values: min-max, 1 - 2 / 2**3
    # throughput ratio num/den from times: den 2 s vs num 1 s -> num is twice as fast
    r = C.paired_ratio([1.0, 2.0], [2.0, 2.0])
    assert (r.lo, r.hi) == (1.0, 2.0)
    with pytest.raises(ValueError, match='equal repetition counts'):
        C.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        C.Stat.of([])


def _binomial_coverage(n: int, k: int) -> float:
    """P(x_k <= median <= x_(n+1-k)) by brute force over the 2**n sign patterns around the true median."""
    inside = 0
    for signs in range(2 ** n):
        below = bin(signs).count('1')  # how many of the n values fall below the true median
        inside += k <= below <= n - k
    return inside / 2 ** n


@pytest.mark.parametrize('n', [1, 2, 3, 5, 6, 7, 11, 14, 21])
def test_median_ci_is_the_narrowest_order_statistic_interval_with_95_percent(n):
    values = [float(v) for v in range(100, 100 - n, -1)]  # any order: sorted inside
    lo, hi, level = C.median_ci(values)
    k = int(lo - min(values)) + 1  # values are consecutive, so lo is the k-th smallest
    assert hi == max(values) - k + 1  # and hi the k-th largest
    assert level == pytest.approx(_binomial_coverage(n, k))
    if n >= 6:  # the largest k that still covers 95 %
        assert level >= C.CI_LEVEL and _binomial_coverage(n, k + 1) < C.CI_LEVEL
    else:  # no k reaches 95 %: min-max
        assert k == 1 and level < C.CI_LEVEL


def test_median_ci_covers_the_median_as_it_says():
    # the promise itself, sampled: intervals from 21 draws of a skewed distribution hold its median >= 95 % of the time
    draws = torch.distributions.Exponential(torch.tensor(1.0))
    torch.manual_seed(0)
    hits = 0
    for _ in range(2000):
        lo, hi, _ = C.median_ci(draws.sample((21,)).tolist())
        hits += lo <= math.log(2.0) <= hi
    assert 0.955 <= hits / 2000 <= 0.99  # 97.3 % promised; binomial sd 0.36 %


def test_median_ci_is_fast_for_many_pairs():
    import time
    t0 = time.perf_counter()
    lo, hi, level = C.median_ci([float(v) for v in range(3001)])
    assert time.perf_counter() - t0 < 1.0  # the binomial sum is carried, not recomputed per k
    assert 0.95 <= level < 0.955 and hi - lo == 3000 - 2 * lo


def test_median_ci_rejects_bad_input():
    with pytest.raises(ValueError, match='at least one value'):
        C.median_ci([])
    with pytest.raises(ValueError, match=r'level must be in \(0, 1\), got 1.5'):
        C.median_ci([1.0], level=1.5)


def test_interleaved_alternates_order_and_counts_calls():
    calls: list[str] = []
    cases = {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}
    times = C.interleaved(cases, device=torch.device('cpu'), reps=3, warmup=1, iters=2)
    assert calls[:2] == ['a', 'b']  # warm-up, one call each
    assert calls[2:] == ['a', 'a', 'b', 'b', 'b', 'b', 'a', 'a', 'a', 'a', 'b', 'b']  # A B, B A, A B
    assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}
    assert all(t > 0 for v in times.values() for t in v)


def test_ratio_verdict_judges_the_confidence_interval():
    # (median, min, max, ci_lo, ci_hi, coverage): only the interval decides
    assert C.ratio_verdict(C.Stat(1.0, 0.90, 1.10, 0.99, 1.01, 0.97), 0.99) == 'yes'
    assert C.ratio_verdict(C.Stat(0.995, 0.90, 1.10, 0.985, 1.01, 0.97), 0.99) == 'not resolved'
    assert C.ratio_verdict(C.Stat(0.97, 0.90, 1.10, 0.96, 0.98, 0.97), 0.99) == 'NO'
    # lower is better (a memory or time ratio)
    assert C.ratio_verdict(C.Stat(1.05, 1.0, 1.2, 1.04, 1.08, 0.97), 1.10, higher_is_better=False) == 'yes'
    assert C.ratio_verdict(C.Stat(1.05, 1.0, 1.2, 1.04, 1.12, 0.97), 1.10, higher_is_better=False) == 'not resolved'
    assert C.ratio_verdict(C.Stat(1.15, 1.0, 1.2, 1.12, 1.18, 0.97), 1.10, higher_is_better=False) == 'NO'
    # the target on the interval's edge: met when the lower bound equals it, not resolved at the upper bound
    assert C.ratio_verdict(C.Stat(0.99, 0.9, 1.1, 0.98, 1.0, 0.97), 0.98) == 'yes'
    assert C.ratio_verdict(C.Stat(0.97, 0.9, 1.1, 0.96, 0.98, 0.97), 0.98) == 'not resolved'
    assert C.ratio_verdict(C.Stat(1.0, 0.9, 1.1, 0.98, 1.02, 0.97), 1.02, higher_is_better=False) == 'yes'
    assert C.ratio_verdict(C.Stat(1.0, 0.9, 1.1, 1.02, 1.04, 0.97), 1.02, higher_is_better=False) == 'not resolved'
    # a Stat built without an interval is judged on its min-max range
    assert C.ratio_verdict(C.Stat(1.0, 0.98, 1.02), 0.97) == 'yes'
    assert C.ratio_verdict(C.Stat(0.97, 0.9, 1.01), 0.99) == 'not resolved'
    assert C.ratio_verdict(C.Stat(0.9, 0.85, 0.95), 0.99) == 'NO'


def test_fmt_ratio_shows_the_interval_and_ci_note_its_coverage():
    assert C.fmt_ratio(C.Stat(0.9751, 0.9, 1.1, 0.9694, 0.9812, 0.97)) == '0.975 [0.969, 0.981]'
    assert C.fmt_ratio(C.Stat(1.0, 0.9, 1.1)) == '1.000 [0.900, 1.100]'
    assert C.ci_note(21) == 'ratios: median [97 % confidence interval of the median, from 21 pairs]'
    assert C.ci_note(5) == 'ratios: median [94 % confidence interval of the median, from 5 pairs]'


def test_peak_step_memory_counts_transient_and_tracked_tensors():
    held = torch.zeros(1 << 18)  # 1 MiB, alive throughout

    def step():
        tmp = torch.ones(1 << 20)  # 4 MiB, freed at the end of the step
        return float(tmp.sum())

    peak = C.peak_step_memory(step, torch.device('cpu'), held)
    assert 5 * 2 ** 20 <= peak < 5.5 * 2 ** 20


def test_dropres_eval_dispatches_no_extra_ops_and_train_adds_dropout():
    base = timm.create_model('test_resnet')
    dropres = timm.create_model('test_resnet_dropres', drop_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    for m in (base, dropres):
        m.eval()
    assert C.count_aten_ops(lambda: dropres(x)) <= C.count_aten_ops(lambda: base(x))
    base.train()
    dropres.train()
    assert C.count_aten_ops(lambda: dropres(x)) > C.count_aten_ops(lambda: base(x))


@pytest.mark.parametrize('module', [inference, training, ceiling, trainer, compile_check, dropout_impl],
                         ids=lambda m: m.__name__.rsplit('.', 1)[-1])
def test_smoke(module, capsys):
    assert module.main(['--smoke']) == 0
    out = capsys.readouterr().out
    assert out.count('| test_resnet') >= 1, out
    assert 'Figure' in out or 'Graph breaks' in out or 'what-if' in out
    if module in (inference, training, trainer, dropout_impl):  # the scripts that judge a ratio against a target
        assert '% confidence interval of the median, from' in out, out
        judged = re.findall(r'\| (\d+\.\d{3}) \[(\d+\.\d{3}), (\d+\.\d{3})\] \| (yes|NO|not resolved) \|', out)
        assert judged, out
        for median, lo, hi, _ in judged:
            assert float(lo) <= float(median) <= float(hi)


def test_dropout_impl_isolated_reports_each_kernel_share(capsys):
    """--isolated times the kernels alone on the step's own dropout inputs; shares are positive percentages."""
    table, records = dropout_impl.isolated(dropout_impl.parse_args(['--smoke', '--isolated', '--variants', 'current']))
    assert [r['variant'] for r in records] == ['current']
    assert 0 < records[0]['share'] < 1 and records[0]['kernel_s'].median > 0
    assert 'Dropout kernels alone' in table and '| test_resnet | contiguous | 2 | current | 5 |' in table


def test_dropout_impl_drops_times_both_drawings(capsys):
    """--drops times drop_positions on the step's own dropout tensors, compiled pass and ATen ops."""
    table, records = dropout_impl.drops(dropout_impl.parse_args(['--smoke', '--drops', '--variants', 'current', 'ops']))
    assert [r['variant'] for r in records] == ['current', 'ops']
    assert all(0 < r['share'] < 1 and r['sites'] == 5 for r in records)  # 4 blocks + the head
    assert 'Drawing the drops of one step alone' in table and '| test_resnet | contiguous | 2 | ops | 5 |' in table
    assert 'compiled CPU kernel: built, so `current` runs it' in table
    with pytest.raises(SystemExit):
        dropout_impl.parse_args(['--drops', '--tails'])
    with pytest.raises(SystemExit, match='--drops compares the variants current, ops'):
        dropout_impl.drops(dropout_impl.parse_args(['--smoke', '--drops', '--variants', 'unfused']))


def test_graph_break_check_traces_active_residual_dropout():
    """The package default res_drop_rate is 0.0; the check must trace blocks whose dropout runs."""
    _, records = compile_check.run(compile_check.parse_args(['--smoke']))
    assert records and all(r['res_drop_rate'] == compile_check.RES_DROP_RATE > 0 for r in records)


def test_dropout_inputs_have_the_train_steps_dtype():
    """--isolated under bf16 must time the kernels on bf16 tensors, as the autocast step feeds them."""
    model = timm.create_model('test_resnet_dropres', res_drop_rate=0.1, drop_rate=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    inputs = dropout_impl.dropout_inputs(model, x, torch.bfloat16)
    assert len(inputs) == 5 and {t.dtype for _, t in inputs} == {torch.bfloat16}  # 4 blocks + the head
    assert {t.dtype for _, t in dropout_impl.dropout_inputs(model, x)} == {torch.float32}


def test_inference_smoke_checks_same_output_and_ops():
    _, records = inference.run(inference.parse_args(['--smoke', '--channels-last', 'no']))
    assert len(records) == 1
    rec = records[0]
    assert rec['same_output'] is True
    base_ops, dropres_ops = rec['ops']
    assert 0 < dropres_ops <= base_ops
    assert rec['base'].median > 0 and rec['dropres'].median > 0


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        inference.parse_args(['--batch-sizes', '0'])
    with pytest.raises(SystemExit):
        training.parse_args(['--reps', '0'])
    with pytest.raises(SystemExit):
        trainer.parse_args(['--compile'])
    with pytest.raises(SystemExit):
        run_all.parse_args(['--only', '9'])


def test_gpu_check_script_is_valid_and_its_flags_parse():
    """gpu_check.sh cannot run here (no GPU), so check its syntax and every figure command's flags."""
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_check.sh'
    subprocess.run(['bash', '-n', str(script)], check=True)
    text = script.read_text().replace('\\\n', ' ')
    train = re.search(r'^TRAIN=\((.*)\)$', text, flags=re.M).group(1)  # the training command, shared
    text = text.replace('"${TRAIN[@]}"', train)
    commands = re.findall(r'^\s*(?:[A-Z_]+=\S+ )?run \d+ benchmarks/(\w+)\.py(.*)$', text, flags=re.M)
    modules = {m.__name__.rsplit('.', 1)[-1]: m
               for m in (inference, training, ceiling, trainer, compile_check, dropout_impl)}
    assert {name for name, _ in commands} == set(modules)
    for name, rest in commands:
        args = modules[name].parse_args(shlex.split(rest) + ['--json', 'x.jsonl'])  # run() appends --json
        if name != 'compile_check':
            assert args.device == 'cuda' and args.dtype == 'bfloat16', (name, rest)
        if name in ('training', 'ceiling', 'trainer', 'dropout_impl'):
            assert args.res_drop_rate > 0, (name, rest)  # the figures must time residual dropout
    compiled = [rest for name, rest in commands if name == 'training' and '--compile' in rest]
    assert len(compiled) == 4 and any('resnext50_32x4d' in rest for rest in compiled)
    # compiled resnet50 once more with the Triton kernels forced as custom ops (issue 22)
    assert re.search(r'^\s*TIMM_DROPRES_DROPOUT_KERNEL=triton run \d+ benchmarks/training\.py .*--compile '
                     r'--archs resnet50$', text, flags=re.M)
    assert any(name == 'trainer' and '--num-workers 8' in rest and '--res-drop-rate 0.1' in rest
               for name, rest in commands)
    assert any(name == 'dropout_impl' and '--variants current unfused' in rest for name, rest in commands)
    assert '"$PY" "$@" --json "$JSONL"' in text and 'benchmarks/gpu_summary.py "$JSONL" --out "$JSON_OUT"' in text
    assert 'docs/results/gpu/$(date -u +%F).json' in text


def test_json_lines_summarised_per_arch_layout_and_mode(tmp_path, capsys):
    """What gpu_check.sh writes: each script appends a JSON line (--json), gpu_summary turns them into
    docs/results/gpu/<date>.json. Eager lines come from real CPU smoke runs; the compiled one is the eager
    line relabelled (compiling on 2 CPU cores takes minutes)."""
    import json

    lines = tmp_path / 'session.jsonl'
    assert training.main(['--smoke', '--json', str(lines)]) == 0
    assert dropout_impl.main(['--smoke', '--variants', 'current', 'unfused', '--json', str(lines)]) == 0
    runs = gpu_summary.read_lines(lines)
    assert [r['script'] for r in runs] == ['training', 'dropout_impl']
    compiled = json.loads(json.dumps(runs[0]))
    compiled['args']['compile'] = True
    lines.write_text(lines.read_text() + json.dumps(compiled) + '\n')
    out = tmp_path / 'gpu' / '2026-12-05.json'
    assert gpu_summary.main([str(lines), '--out', str(out), '--command', 'bash benchmarks/gpu_check.sh']) == 0
    summary = json.loads(out.read_text())
    assert summary['schema'] == gpu_summary.SCHEMA and summary['command'] == 'bash benchmarks/gpu_check.sh'
    env = summary['environment']
    assert env['device'] == 'cpu' and env['torch'] == torch.__version__ and env['timm'] == timm.__version__
    assert env['dropout_kernel'] == 'auto' and 'triton' in env
    entry = summary['training']['test_resnet']['contiguous']
    for mode in ('eager', 'compiled'):
        step, mem = entry[mode]['step_ratio'], entry[mode]['memory_ratio']
        assert step['lo'] <= step['median'] <= step['hi'] and mem > 0, entry
        assert step['ci_lo'] <= step['median'] <= step['ci_hi'] and 0 <= step['ci_level'] < 1, step
        # every repetition's seconds, so the ratio can be recomputed from the summary
        seconds = entry[mode]['step_seconds']
        assert set(seconds) == {'base', 'dropres'} and len(seconds['base']) == len(seconds['dropres']) >= 1
        ratios = sorted(b / d for b, d in zip(seconds['base'], seconds['dropres'], strict=True))
        assert step['lo'] == pytest.approx(ratios[0]) and step['hi'] == pytest.approx(ratios[-1])
        assert entry[mode]['res_drop_rate'] == training.RES_DROP_RATE and entry[mode]['batch'] == 2
    assert [r['variant'] for r in summary['kernels'][0]['records']] == ['current', 'unfused']
    forced = json.loads(json.dumps(compiled))  # gpu_check.sh's run under TIMM_DROPRES_DROPOUT_KERNEL=triton
    forced['environment']['dropout_kernel'] = 'triton'
    lines.write_text(lines.read_text() + json.dumps(forced) + '\n')
    assert gpu_summary.main([str(lines), '--out', str(out)]) == 0
    modes = json.loads(out.read_text())['training']['test_resnet']['contiguous']
    assert set(modes) == {'eager', 'compiled', 'compiled (triton)'} and modes['compiled'] == entry['compiled']
    lines.write_text('not json\n')
    with pytest.raises(SystemExit):
        gpu_summary.main([str(lines), '--out', str(out)])
    assert 'session.jsonl:1 is not a JSON line' in capsys.readouterr().err


@pytest.mark.parametrize('module', [training, ceiling, dropout_impl, trainer], ids=lambda m: m.__name__)
@pytest.mark.parametrize('rate', ['0', '1', 'nan', '-0.1'])
def test_res_drop_rate_that_times_nothing_is_refused(module, rate, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(['--smoke', '--res-drop-rate', rate])
    assert f'--res-drop-rate: must be in (0, 1), got {rate}' in capsys.readouterr().err


def test_gpu_check_refuses_a_bad_budget_before_anything_runs():
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_check.sh'
    env = dict(os.environ, GPU_CHECK_BUDGET='9m', PY='/nonexistent/python')
    res = subprocess.run(['bash', str(script)], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "GPU_CHECK_BUDGET must be a whole number of seconds" in res.stderr
    assert "'9m'" in res.stderr and res.stdout == ''


def test_run_all_smoke_prints_the_command_and_a_figure(capsys):
    assert run_all.main(['--smoke', '--only', '1']) == 0
    out = capsys.readouterr().out
    assert '`python benchmarks/run_all.py --smoke --only 1`' in out
    assert '### Figure 1' in out and '_total:' in out


def test_dropout_variants_are_the_same_inverted_dropout():
    """The what-if kernels must be dropout: zeros or x / (1 - p), unbiased, grads through the same mask."""
    x = torch.randn(64, 32, 8, 8, dtype=torch.float64, requires_grad=True)
    for name, cls in dropout_impl.VARIANTS.items():
        m = cls(0.25).train()
        torch.manual_seed(0)
        y = m(x)
        y.sum().backward()
        keep = y != 0
        assert torch.allclose(y[keep], x[keep].detach() / 0.75), name
        assert torch.allclose(x.grad, keep.to(x.dtype) / 0.75), name
        assert abs(1 - keep.double().mean().item() - 0.25) < 0.02, name
        x.grad = None
        assert m.eval()(x) is x, name


def test_cpu_clock_counts_work_not_waiting():
    import time

    def busy():
        t = time.process_time()
        while time.process_time() - t < 0.02:
            pass

    cases = {'sleep': lambda: time.sleep(0.05), 'busy': busy}
    cpu = C.interleaved(cases, device=torch.device('cpu'), reps=2, warmup=0, iters=1, clock='cpu')
    wall = C.interleaved(cases, device=torch.device('cpu'), reps=2, warmup=0, iters=1, clock='wall')
    assert max(cpu['sleep']) < 0.01 <= min(cpu['busy'])
    assert min(wall['sleep']) >= 0.05
    with pytest.raises(ValueError, match='cannot time work on cuda'):
        C.interleaved(cases, device=torch.device('cuda'), reps=1, warmup=0, iters=1, clock='cpu')
    with pytest.raises(ValueError, match='clock must be one of'):
        C.interleaved(cases, device=torch.device('cpu'), reps=1, warmup=0, iters=1, clock='gpu')


@pytest.mark.slow
def test_study_engine_smoke_times_both_sides(capsys):
    """One over-fitting run per side (1 epoch, 500 test images): both train, and the table gives the CPU ratio."""
    assert study_engine.main(['--smoke', '--configs', 'none']) == 0
    out = capsys.readouterr().out
    assert '| none | 0 |' in out and '| all |' in out and 'engine / harness (CPU)' in out


def test_dropout_impl_tails_times_the_fused_and_separate_tails():
    """--tails: every post-activation block's tail is captured (4 in test_resnet) and the head dropout alone;
    the extra time over the base's tails is reported for both kernels."""
    table, records = dropout_impl.tails(dropout_impl.parse_args(['--smoke', '--tails', '--variants', 'current',
                                                                  'unfused']))
    assert [r['variant'] for r in records] == ['current', 'unfused']
    assert all(r['fused_sites'] == 4 and r['other_sites'] == 1 and r['step_s'] > 0 for r in records)
    assert 'Dropout with the residual addition, timed alone' in table
    model = timm.create_model('test_resnet_dropres', res_drop_rate=0.1, drop_rate=0.1).train()
    fused, singles = dropout_impl.tail_inputs(model, torch.randn(2, 3, 32, 32))
    assert [(p, relu) for p, _, _, relu in fused] == [(0.1, True)] * 4 and len(singles) == 1
    with pytest.raises(SystemExit):
        dropout_impl.parse_args(['--isolated', '--tails'])
