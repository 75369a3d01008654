"""Graph-break and scripting check: does a dropres model stay one graph under ``torch.compile``?

``torch._dynamo.explain`` traces the model in train and eval mode (where ``ResidualDropout`` takes a
different branch) and reports graph and break counts with reasons; ``torch.jit.script`` is tried too,
because timm models are expected to script. A break or a scripting failure is printed, not raised:
this is a report, and the exit status stays 0.

    python benchmarks/compile_check.py
"""
from __future__ import annotations

import argparse
import sys
import warnings

import timm
import torch

try:
    from benchmarks import common as C
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import common as C  # type: ignore[no-redef]

import timm_dropres

ARCHS = ('resnet50', 'resnetv2_50')


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


def run(args: argparse.Namespace) -> tuple[str, list[dict]]:
    rows, records = [], []
    x = torch.randn(2, 3, args.img_size, args.img_size)
    for arch in args.archs:
        for pos in args.positions:
            name = arch + timm_dropres.SUFFIX
            model = timm.create_model(name, res_drop_pos=pos)
            pos = timm_dropres.dropout_args(model)['res_drop_pos']  # what the blocks resolved it to
            result: dict = dict(model=name, res_drop_pos=pos)
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
    return C.print_table(run(parse_args(argv))[0])


if __name__ == '__main__':
    raise SystemExit(main())
