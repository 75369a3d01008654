"""Graph-break and scripting check: does a dropres model stay one graph under ``torch.compile``?

``torch._dynamo.explain`` traces the model in train and eval mode (where ``ResidualDropout`` takes a
different branch) and reports graph and break counts with reasons; ``torch.jit.script`` is tried too,
because timm models are expected to script. A break or a scripting failure is printed, not raised:
this is a report, and the exit status stays 0.

``--fusion`` also compiles one training step (forward and backward) of the first residual block of each
arch with inductor and lists the kernels it generates: inductor names each fused kernel after the ATen
ops it contains (``cpp_fused_...`` on CPU, ``triton_..._fused_...`` on CUDA), so the kernels holding
``native_dropout`` show what the dropout was fused with. This needs a C++ compiler on CPU (about a
minute per block on 2 busy cores), so it is not part of ``make bench``.

    python benchmarks/compile_check.py
    python benchmarks/compile_check.py --fusion --archs resnet50 resnetv2_50
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch

try:
    from benchmarks import common as C
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]

import timm_dropres

ARCHS = ('resnet50', 'resnetv2_50')
RES_DROP_RATE = 0.1  # residual and head dropout on: the package defaults (0.0) would trace no dropout


def explain(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, list[str]]:
    """(graphs, graph breaks, break reasons) of one forward under dynamo."""
    torch._dynamo.reset()
    out = torch._dynamo.explain(model)(x)
    return out.graph_count, out.graph_break_count, [str(r.reason) for r in out.break_reasons]


def try_script(model: torch.nn.Module, x: torch.Tensor) -> str:
    """'yes' when torch.jit.script works and matches eager in eval mode, else the first error line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated in new torch
            scripted = torch.jit.script(model)
        model.eval()
        scripted.eval()
        with torch.no_grad():
            same = torch.equal(scripted(x), model(x))
        return 'yes' if same else 'scripts, but eval output differs'
    except Exception as e:  # report any scripting failure; this is a check, not a test
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f'NO: {type(e).__name__}: {first[:100]}'


def generated_kernels(module: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the kernels inductor generates for one forward + backward of ``module(x)``, in order.

    Read from the ``output_code.py`` files that ``torch.compile(options={'trace.enabled': True})`` writes
    (a documented inductor option), forward graph first.
    """
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as tmp:
        compiled = torch.compile(module, options={'trace.enabled': True, 'trace.debug_dir': tmp})
        compiled(x).float().sum().backward()
        files = sorted(Path(tmp).rglob('output_code.py'), key=lambda f: f.stat().st_mtime)
        code = '\n'.join(f.read_text() for f in files)
    torch._dynamo.reset()
    return re.findall(r'^(\w*fused\w*) = async_compile\.', code, flags=re.M)


def fusion(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Which kernels hold the dropout when one residual block is compiled (forward + backward)."""
    device = C.resolve_device(args.device)
    rows, records = [], []
    for arch in args.archs:
        model = timm.create_model(arch + timm_dropres.SUFFIX, drop_rate=RES_DROP_RATE, res_drop_rate=RES_DROP_RATE)
        block = next(timm_dropres.residual_blocks(model))[1].train().to(device)
        width = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
        x = torch.randn(2, width, 16, 16, device=device, requires_grad=True)
        if args.channels_last:
            block = block.to(memory_format=torch.channels_last)
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        kernels = generated_kernels(block, x)
        dropout = [k for k in kernels if 'dropout' in k]
        rows.append([f'{arch}{timm_dropres.SUFFIX}', type(block).__name__, block.res_drop_pos, len(kernels),
                     len(dropout), '<br>'.join(f'`{k}`' for k in dropout) or 'NONE'])
        records.append(dict(arch=arch, kernels=kernels, dropout_kernels=dropout))
    title = (f'### Fusion under torch.compile (inductor, {device.type}, one residual block, train mode, forward + '
             f'backward{", channels_last" if args.channels_last else ""})')
    headers = ['model', 'block', 'res_drop_pos', 'kernels', 'kernels with dropout', 'their names (fused ATen ops)']
    return '\n'.join([title, '', C.markdown_table(headers, rows)]), records


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    rows, records = [], []
    x = torch.randn(2, 3, args.img_size, args.img_size)
    for arch in args.archs:
        for pos in args.positions:
            name = arch + timm_dropres.SUFFIX
            model = timm.create_model(name, res_drop_pos=pos, drop_rate=RES_DROP_RATE, res_drop_rate=RES_DROP_RATE)
            resolved = timm_dropres.dropout_args(model)  # what the blocks resolved the position to
            pos = resolved['res_drop_pos']
            result: dict = dict(model=name, res_drop_pos=pos, res_drop_rate=resolved['res_drop_rate'])
            for mode in ('train', 'eval'):
                model.train(mode == 'train')
                result[mode] = explain(model, x)
            result['script'] = try_script(model, x)
            reasons = sorted({r for m in ('train', 'eval') for r in result[m][2]})
            rows.append([name, pos, *(f'{result[m][0]} / {result[m][1]}' for m in ('train', 'eval')),
                         '; '.join(reasons) or '-', result['script']])
            records.append(result)
            if arch.startswith('resnetv2'):
                break  # pre-activation blocks have a single position: both values resolve to it
    title = (f'### Graph breaks and scripting (torch._dynamo.explain, {args.img_size}px; graphs / breaks per '
             'forward)')
    headers = ['model', 'res_drop_pos', 'train', 'eval', 'break reasons', 'torch.jit.script']
    return '\n'.join([title, '', C.markdown_table(headers, rows)]), records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--smoke', action='store_true', help='tiny run (test_resnet) so tests keep the script alive')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (default: torch decides)')
    p.add_argument('--archs', nargs='+', default=list(ARCHS), help=f'base archs (default: {" ".join(ARCHS)})')
    p.add_argument('--positions', nargs='+', default=['after_last_bn', 'before_last_conv'],
                   choices=('after_last_bn', 'before_last_conv'), help='res_drop_pos values to check (default: both)')
    p.add_argument('--img-size', type=int, default=64, help='input size for tracing (default: 64)')
    p.add_argument('--fusion', action='store_true',
                   help='also compile one residual block per arch with inductor and list the kernels holding the '
                        'dropout (needs a C++ compiler on CPU; minutes)')
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='device for --fusion (default: cpu)')
    p.add_argument('--channels-last', action='store_true', help='--fusion in channels_last')
    C.add_json_flag(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--smoke' in argv:
        argv = ['--threads', '1', '--archs', 'test_resnet', '--img-size', '32',
                '--positions', 'after_last_bn'] + argv
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.img_size < 1:
        p.error(f'--img-size must be >= 1, got {args.img_size}')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table, records = run(args)
    if args.fusion:
        fused_table, fused_records = fusion(args)
        table += '\n\n' + fused_table
        records = records + [dict(fusion=r) for r in fused_records]
    return C.emit(args, table, records, script='compile_check')


if __name__ == '__main__':
    raise SystemExit(main())
