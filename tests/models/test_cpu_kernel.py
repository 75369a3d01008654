"""The compiled CPU kernel (``cpu_kernel``): it builds here, and it changes no number.

At equal drops the compiled passes give what the separate ATen ops give (``set_dropout_kernel('unfused')``) bit
for bit: forward and both gradients, every dtype, both layouts, with and without the folded ReLU, in place or
not, on one thread or several, and whole models over a train step. The drops are equal too: the compiled pass
that turns random words into positions gives the op chain's positions for every 24-bit word.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import timm
import torch

import timm_dropres
from timm_dropres.models import cpu_dropout, cpu_kernel, layers
from timm_dropres.models.cpu_dropout import _memory_order, drop_positions

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FORMATS = [torch.contiguous_format, torch.channels_last]


def test_kernel_builds_here():
    """CI installs g++ and ninja, so the path users get by default is the one under test."""
    assert cpu_kernel.build_error() is None and cpu_kernel.available()
    assert hasattr(torch.ops.timm_dropres_cpu, 'drop_add')


def test_build_name_tracks_source_flags_torch_and_cpu(tmp_path, monkeypatch):
    name, source = cpu_kernel._extension_name(), cpu_kernel.SOURCE
    assert name.startswith(f'timm_dropres_cpu_{torch.backends.cpu.get_cpu_capability().lower()}_')
    copy = tmp_path / 'dropout_cpu.cpp'
    copy.write_bytes(source.read_bytes() + b'\n// changed\n')
    monkeypatch.setattr(cpu_kernel, 'SOURCE', copy)
    assert cpu_kernel._extension_name() != name
    monkeypatch.setattr(cpu_kernel, 'SOURCE', source)
    assert cpu_kernel._extension_name() == name
    monkeypatch.setattr(cpu_kernel, '_CFLAGS', cpu_kernel._CFLAGS + ('-O2',))
    assert cpu_kernel._extension_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(torch, '__version__', torch.__version__ + '+other')
    assert cpu_kernel._extension_name() != name


def _fused_step(kernel: str, x0, s0, g, p, relu, inplace):
    x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    branch = x * 1.0  # a non-leaf, as a BN output: in place may write into it
    torch.manual_seed(11)
    with layers.dropout_kernel(kernel):
        out = layers.residual_dropout_add(branch, s, p, True, relu, inplace=inplace)
        out.backward(g)
    return out.detach(), x.grad, s.grad


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern, so that -0.0 and +0.0 differ."""
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def _equal(a, b) -> bool:
    """Equal bit for bit, NaN for NaN (a NaN's payload aside: c10's float-to-bfloat16 and ATen's vectorised
    conversion write different quiet NaNs)."""
    for u, v in zip(a, b, strict=True):
        nan = u.isnan()
        if not torch.equal(nan, v.isnan()) or not torch.equal(_bits(u)[~nan], _bits(v)[~nan]):
            return False
    return True


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('inplace', [False, True])
def test_drop_add_equals_the_separate_ops_bit_for_bit(dtype, fmt, relu, inplace):
    x0 = torch.randn(4, 8, 9, 7).to(dtype)
    x0.view(-1)[::5] = float('inf')  # a dropped inf leaves exactly the shortcut (as the separate ops' zero fill)
    s0 = torch.randn(4, 8, 9, 7).to(dtype)
    s0.view(-1)[::7] = float('nan')  # NaN passes the ReLU and its gradient, as torch.relu / threshold_backward
    s0.view(-1)[1::3] = -0.0  # dropped: 0 + (-0) is +0 in the separate ops
    x0, s0 = x0.contiguous(memory_format=fmt), s0.contiguous(memory_format=fmt)
    g = torch.randn(4, 8, 9, 7).to(dtype).contiguous(memory_format=fmt)
    compiled = _fused_step('cpp', x0, s0, g, 0.1, relu, inplace)
    separate = _fused_step('unfused', x0, s0, g, 0.1, relu, inplace)
    assert compiled[0].stride() == x0.stride() and _equal(compiled, separate)
    assert compiled[0].isinf().any() and compiled[0].isnan().any() and (_bits(compiled[0]) == 0).any()


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('fmt', FORMATS)
def test_single_dropout_equals_the_separate_ops_bit_for_bit(dtype, fmt):
    x0 = torch.randn(4, 8, 9, 7).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn_like(x0)
    runs = []
    for kernel in ('cpp', 'unfused'):
        x = x0.clone().requires_grad_()
        torch.manual_seed(5)
        with layers.dropout_kernel(kernel):
            y = layers.residual_dropout(x, 0.1, True)
            y.backward(g)
        runs.append((y.detach(), x.grad))
    assert runs[0][0].stride() == x0.stride() and _equal(*runs)


def test_several_threads_give_the_one_thread_result():
    """Large enough for at::parallel_for to split the chunks between threads (grain: 32 chunks of 1024)."""
    x0, s0 = torch.randn(2, 64, 40, 40), torch.randn(2, 64, 40, 40)
    g = torch.randn(2, 64, 40, 40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused_step('cpp', x0, s0, g, 0.1, True, True)
        torch.set_num_threads(2)
        two = _fused_step('cpp', x0, s0, g, 0.1, True, True)
    finally:
        torch.set_num_threads(threads)
    assert _equal(one, two)


def test_gradient_in_another_layout():
    """autograd may hand backward a gradient laid out otherwise than the output: it is copied into order."""
    x0, s0 = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    g = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert _equal(_fused_step('cpp', x0, s0, g, 0.1, True, True), _fused_step('unfused', x0, s0, g, 0.1, True, True))


@pytest.mark.parametrize('relu', [False, True])
def test_fused_op_with_relu_has_gradients_and_double_backward(relu):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    s = torch.randn_like(x)
    order = _memory_order(x)
    drop = drop_positions(x.numel(), 0.3)
    with layers.dropout_kernel('cpp'):
        fn = lambda a, b: cpu_dropout._ApplyDropAdd.apply(a * 1.0, b, drop, 1.25, order, True, relu)  # noqa: E731
        args = (x.requires_grad_(), s.requires_grad_())
        assert torch.autograd.gradcheck(fn, args) and torch.autograd.gradgradcheck(fn, args)


def test_fused_block_saves_the_drops_and_its_output_only():
    """What autograd keeps: int32 positions (0.4 bytes per element at p = 0.1) and, with the ReLU folded in,
    the block's output, which the ReLU saved on its own before (and the next block's input besides)."""
    x = torch.randn(8, 32, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            layers.dropout_kernel('cpp'):
        out = layers.residual_dropout_add(x * 1.0, torch.randn_like(x), 0.1, True, True, inplace=True)
    drops, output = saved
    assert drops.dtype == torch.int32 and drops.numel() <= 0.12 * x.numel()
    assert output.data_ptr() == out.data_ptr()


def test_kernel_rejects_mismatched_arguments():
    x, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    pos = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match='strides differ'):
        cpu_kernel.drop_add(x, s.contiguous(memory_format=torch.channels_last), pos, 1.1, False, x)
    for bad in ([0, 72], [-1, 5], [0, 100, 5], [3, 3]):  # past the end, negative, unsorted, repeated
        with pytest.raises(RuntimeError, match=r'strictly increasing and lie in \[0, 72\)'):
            cpu_kernel.drop_add(x, s, torch.tensor(bad), 1.1, False, x)
    with pytest.raises(RuntimeError, match='must not share memory with shortcut'):
        cpu_kernel.drop_add(x, s, pos, 1.1, False, s)
    with pytest.raises(RuntimeError, match='dtypes differ'):
        cpu_kernel.drop_scale(x, pos, 1.1, torch.empty_like(x, dtype=torch.float64))
    with pytest.raises(RuntimeError, match='int32 or int64'):
        cpu_kernel.drop_scale(x, pos.float(), 1.1, torch.empty_like(x))
    buf = torch.randn(80)  # views at an offset into one buffer: out would overwrite what the loop reads next
    a, b = buf[:72].view(2, 4, 3, 3), buf[8:80].view(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match='drop_scale: out and src must be the same tensor or not overlap'):
        cpu_kernel.drop_scale(a, pos, 1.1, b)
    with pytest.raises(RuntimeError, match='drop_add: out and x must be the same tensor or not overlap'):
        cpu_kernel.drop_add(a, s, pos, 1.1, False, b)
    g, out = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for args, names in [((g, out, pos, 1.1, g, torch.empty_like(g)), 'the gradients written and grad'),
                        ((g, out, pos, 1.1, torch.empty_like(g), out), 'the gradients written and out'),
                        ((g, out, pos, 1.1, a, b), 'grad_x and grad_shortcut')]:
        with pytest.raises(RuntimeError, match=f'drop_add_relu_backward: {names} must not overlap'):
            torch.ops.timm_dropres_cpu.drop_add_relu_backward(*args)


def _chain_positions(words: torch.Tensor, p: float) -> torch.Tensor:
    """The op chain of ``drop_positions`` on given words, as int64 (never wraps)."""
    uniform = words.bitwise_and((1 << 24) - 1).float().mul_(2.0 ** -24)
    return cpu_dropout.geometric_gaps(uniform, p).cumsum(0, dtype=torch.int64).sub_(1)


def _check_words(words: torch.Tensor, p: float, chunk: int) -> None:
    for part in words.split(chunk):
        expected, got = _chain_positions(part, p), part.clone()
        assert cpu_kernel.geometric_positions_(got, 1.0 / math.log1p(-p), 1 << 31, -1) == part.numel()
        assert torch.equal(got.long(), expected)


@pytest.mark.parametrize('p', [0.125, 0.1, 0.05, 0.01])
def test_positions_from_every_word_equal_the_op_chain(p):
    """All 2**24 uniforms (with random high bytes, which the pass must ignore), in chunks of 2**20 words."""
    gen = torch.Generator().manual_seed(0)
    words = torch.arange(1 << 24, dtype=torch.int32)
    words.bitwise_or_(torch.randint(-128, 128, words.shape, generator=gen, dtype=torch.int32) << 24)
    _check_words(words, p, 1 << 20)


@pytest.mark.parametrize('p', [5e-7, 1.7e-8])
def test_gaps_past_2_to_the_24_round_as_the_op_chain_rounds(p):
    """Below p = 9.9e-7 the largest gaps pass 2**24, where float32 holds only even numbers: the chain's
    ``floor_().add_(1.0)`` rounds there, and the compiled pass must round alike. The top 4096 words (the
    largest gaps) and 4096 random ones."""
    gen = torch.Generator().manual_seed(1)
    top = torch.arange((1 << 24) - 4096, 1 << 24, dtype=torch.int32)
    words = torch.cat([top, torch.randint(0, 1 << 24, (4096,), generator=gen, dtype=torch.int32)])
    largest = _chain_positions(top[-1:], p).item() + 1
    assert largest > 1 << 24 and largest % 2 == 0  # the rounding is really exercised
    _check_words(words, p, 1)


@pytest.mark.parametrize('n,p,draws', [
    (0, 0.1, None), (1, 0.1, None), (12345, 0.05, None), (2_000_000, 0.1, None), (40_000, 0.003, None),
    (5000, 0.1, 3),  # three gaps a draw: the draw-on loop, many times
    (1 << 25, 4.47e-7, None),  # gaps past 2**24
    (5, 1e-8, 1),  # int32 reach, but a gap could pass 2**30: the op chain under both choices
])
@pytest.mark.parametrize('threads', [1, 2])
def test_drop_positions_are_the_same_with_or_without_the_compiled_pass(n, p, draws, threads):
    """Same seed, same positions and dtype, and the generator left in the same state after."""
    runs = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for kernel in ('ops', 'cpp'):
            torch.manual_seed(7)
            with layers.dropout_kernel(kernel):
                runs.append((drop_positions(n, p, draws), torch.rand(2)))
    finally:
        torch.set_num_threads(before)
    (ops, ops_next), (cpp, cpp_next) = runs
    assert cpp.dtype == ops.dtype == torch.int32 and torch.equal(cpp, ops) and torch.equal(cpp_next, ops_next)


def test_positions_pass_stops_at_n_and_rejects_bad_arguments():
    words = torch.zeros(10, dtype=torch.int32)  # u = 0: gaps of 1
    assert cpu_kernel.geometric_positions_(words, -10.0, 4, -1) == 4 and words[:4].tolist() == [0, 1, 2, 3]
    words = torch.zeros(3, dtype=torch.int32)
    assert cpu_kernel.geometric_positions_(words, -10.0, 100, 41) == 3 and words.tolist() == [42, 43, 44]
    assert cpu_kernel.geometric_positions_(torch.zeros(3, dtype=torch.int32), -10.0, 0, -1) == 0

    def call(words=None, inv_log=-10.0, n=5, base=-1):
        words = torch.zeros(4, dtype=torch.int32) if words is None else words
        return cpu_kernel.geometric_positions_(words, inv_log, n, base)

    with pytest.raises(RuntimeError, match='contiguous 1-D int32'):
        call(words=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r'log\(1 - p\), in \[-6.45e7, 0\) \(p >= 1.6e-8\), got 0.5'):
        call(inv_log=0.5)
    for bad in (-6.5e7, float('nan'), float('-inf')):  # a gap could pass 2**30; not a number
        with pytest.raises(RuntimeError, match='inv_log must be'):
            call(inv_log=bad)
    with pytest.raises(RuntimeError, match=r'n must be in \[0, 2\*\*31\] .*got 4294967296'):
        call(n=1 << 32)
    with pytest.raises(RuntimeError, match=r'n must be in \[0, 2\*\*31\]'):
        call(n=-1)
    for base in (-2, 5, (1 << 63) - 1):  # below -1; at n; past any sum
        with pytest.raises(RuntimeError, match=rf'base must be in \[-1, n\) .*got {base} for n = 5'):
            call(base=base)


@pytest.mark.parametrize('build', [
    lambda: timm.create_model('test_resnet_dropres', num_classes=3, drop_rate=0.1, res_drop_rate=0.1),
    lambda: timm.create_model('resnet18_dropres', num_classes=3, res_drop_rate=0.1, channels=(8, 8, 8, 8),
                              stem_width=8),
    lambda: timm.create_model('resnetv2_50_dropres', num_classes=3, res_drop_rate=0.1, layers=(1, 1, 1, 1)),
    lambda: timm_dropres.convert(
        __import__('torchvision').models.resnet50(num_classes=3, width_per_group=8), res_drop_rate=0.1),
], ids=['timm_bottleneck', 'timm_basic', 'timm_preact', 'torchvision_bottleneck'])
@pytest.mark.parametrize('fmt', FORMATS)
def test_train_step_equals_the_separate_ops_bit_for_bit(build, fmt, one_torch_thread):
    """A whole train step (forward, loss, every parameter's gradient) with the compiled kernel is the train
    step of the separate ops at the same seed: the kernel changes speed, not a single number."""
    model = build().train().to(memory_format=fmt)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
    runs = []
    for kernel in ('cpp', 'unfused'):
        model.zero_grad()
        torch.manual_seed(4)
        with layers.dropout_kernel(kernel):
            out = model(x)
            out.square().sum().backward()
        runs.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    assert _equal(*runs)


def test_forced_cpp_says_why_it_cannot_run_and_auto_falls_back(monkeypatch, caplog):
    """Where the kernel cannot be built: 'cpp' raises with the reason; 'auto' logs it once and runs the
    ATen-op kernel, which gives the compiled kernel's drops."""
    x0, s0, g = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    compiled = _fused_step('cpp', x0, s0, g, 0.1, True, True)
    monkeypatch.setattr(cpu_kernel, '_build', lambda: 'CalledProcessError: no C++ compiler')
    monkeypatch.setattr(cpu_kernel, '_warned', False)
    with pytest.raises(RuntimeError, match=r'"cpp"\) cannot be built: CalledProcessError: no C\+\+ compiler'):
        _fused_step('cpp', x0, s0, g, 0.1, True, True)
    with caplog.at_level(logging.WARNING, logger='timm_dropres.models.cpu_kernel'):
        fallback = _fused_step('auto', x0, s0, g, 0.1, True, True)
        again = _fused_step('auto', x0, s0, g, 0.1, True, True)
    assert [r.getMessage().endswith('no C++ compiler') for r in caplog.records] == [True]  # logged once
    ops = _fused_step('ops', x0, s0, g, 0.1, True, True)
    assert _equal(fallback, ops) and _equal(again, ops)
    dropped = compiled[1] == 0  # the same drops; values up to the ATen-op kernel's fused rounding
    assert torch.equal(dropped, fallback[1] == 0)
    torch.testing.assert_close(fallback[0], compiled[0], rtol=1e-6, atol=1e-6)


def test_build_directory_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    assert cpu_kernel.build_directory() == tmp_path / cpu_kernel._extension_name()
    monkeypatch.delenv('TORCH_EXTENSIONS_DIR')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))  # torch's own default honours it
    assert cpu_kernel.build_directory().parent == tmp_path / 'xdg' / 'torch_extensions'
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert cpu_kernel.build_directory().parent == Path.home() / '.cache' / 'torch_extensions'


@pytest.mark.parametrize('create_graph', [False, True])
@pytest.mark.parametrize('forward_kernel,backward_kernel', [('ops', 'cpp'), ('cpp', 'ops')])
def test_backward_runs_what_its_forward_ran(forward_kernel, backward_kernel, create_graph, monkeypatch):
    """The kernel is chosen once per call, in forward: a choice changed before backward (or a backward that is
    itself differentiated) neither starts a build nor switches kernels midway."""
    calls = []
    for name in ('drop_scale', 'drop_add', 'drop_add_relu_backward'):
        real = getattr(cpu_kernel, name)
        monkeypatch.setattr(cpu_kernel, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    for relu in (False, True):
        with layers.dropout_kernel(forward_kernel):
            single = layers.residual_dropout(x, 0.1, True)
            fused = layers.residual_dropout_add(x * 1.0, s, 0.1, True, relu, inplace=True)
        forward_calls, calls[:] = list(calls), []
        with layers.dropout_kernel(backward_kernel):
            grads = torch.autograd.grad((single.sum() + fused.square().sum()), (x, s), create_graph=create_graph)
            if create_graph:
                torch.autograd.grad(sum(g.square().sum() for g in grads), (x, s))
        assert bool(forward_calls) == (forward_kernel == 'cpp')
        assert bool(calls) == (forward_kernel == 'cpp'), calls
        calls.clear()


_TRAIN_STEP = '''
import logging, sys, torch, timm, timm_dropres
from timm_dropres.models import cpu_kernel
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
model = timm.create_model('test_resnet_dropres', num_classes=3, res_drop_rate=0.1).train()
model(torch.randn(2, 3, 32, 32)).sum().backward()
print(cpu_kernel.build_error())
'''


@pytest.mark.slow
def test_without_ninja_a_train_step_falls_back_and_says_why(tmp_path):
    """A user without ninja: the first train step logs why once and trains on the ATen-op kernel."""
    import shutil
    import subprocess

    from helpers_train import PYTHON, subprocess_env

    bin_dir = tmp_path / 'bin'  # PATH with a compiler but no ninja
    bin_dir.mkdir()
    for tool in ('c++', 'g++', 'gcc', 'cc'):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = subprocess_env(PATH=str(bin_dir), TORCH_EXTENSIONS_DIR=str(tmp_path / 'ext'))
    res = subprocess.run([PYTHON, '-c', _TRAIN_STEP], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().startswith('ninja is not on PATH')
    assert res.stderr.count('could not be built') == 1 and 'TIMM_DROPRES_DROPOUT_KERNEL=ops' in res.stderr
    assert not (tmp_path / 'ext').exists()


@pytest.mark.slow
def test_processes_starting_together_build_once(tmp_path):
    """DDP ranks or dropres-study workers on a fresh machine: two processes reach their first train step at
    once, one builds while the other waits on torch's build lock, and both train with the compiled kernel."""
    import subprocess

    from helpers_train import PYTHON, subprocess_env

    env = subprocess_env(TORCH_EXTENSIONS_DIR=str(tmp_path))
    procs = [subprocess.Popen([PYTHON, '-c', _TRAIN_STEP], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ['None', 'None']
    builds = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert [d.name for d in builds] == [cpu_kernel._extension_name()]
    assert len(list(builds[0].glob('*.so'))) == 1
