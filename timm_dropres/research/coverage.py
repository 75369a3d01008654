"""Which of timm's BatchNorm residual architectures have a ``*_dropres`` twin: counted by code, not by hand.

An architecture counts as a *BatchNorm residual network* when the placement audit's trace of one train-mode
forward pass (on the meta device: no memory, no arithmetic) finds at least one residual merge whose branch
holds a BatchNorm with running statistics (``AuditReport.bn_merges``), the networks the guideline is about.
Models without a running-statistics BatchNorm module are not traced. ``coverage()`` returns one row per timm
architecture (deprecated aliases and the plugin's own models left out); ``format_coverage`` writes the summary
and the uncovered architectures by module, which the README's figure and ``docs/coverage.md`` come from
(``python -m timm_dropres.research.coverage --out docs/coverage.md --json docs/results/coverage.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Sequence

import timm
import torch
import torch.nn as nn
from timm.models import get_arch_pretrained_cfgs, model_entrypoint

from ..models.convert import residual_blocks
from ..models.dropres import SUFFIX
from ..models.families import no_head_position
from ..models.placement import SITE_LOCATIONS
from ..models.summary import dropout_sites
from .audit import audit

__all__ = ['CoverageRow', 'timm_architectures', 'classify', 'coverage', 'summarize', 'format_coverage', 'main']


@dataclass(frozen=True)
class CoverageRow:
    """One timm architecture.

    Attributes:
        name: the architecture (``efficientnet_b0``).
        module: the timm module that registers it (``efficientnet``).
        has_bn: a BatchNorm with running statistics is among its modules.
        bn_merges: residual merges with such a BatchNorm in their branch (0 when not traced).
        twin: ``<name>_dropres`` is registered.
        tags: how many pretrained tags the base has.
        error: why it could not be built or traced, if it could not.
        twin_check: for a twin, what :func:`check_twin` found wrong ('' when nothing).
    """

    name: str
    module: str
    has_bn: bool
    bn_merges: int
    twin: bool
    tags: int
    error: str = ''
    twin_check: str = ''

    @property
    def bn_residual(self) -> bool:
        """A BatchNorm residual network: the population the coverage figure is out of."""
        return self.bn_merges > 0


def timm_architectures() -> List[str]:
    """Every timm architecture, without deprecated aliases and without this plugin's own registrations."""
    return [n for n in timm.list_models() if not n.endswith(SUFFIX)
            and not model_entrypoint(n).__module__.startswith('timm_dropres.')]


def classify(name: str) -> CoverageRow:
    """Build ``name`` on the meta device and trace it once if it has a running-statistics BatchNorm.

    Args:
        name: a timm architecture.

    Returns:
        Its row; ``error`` says why it could not be built or traced (it then counts as not BN residual).
    """
    module = model_entrypoint(name).__module__.rpartition('.')[2]
    twin = timm.is_model(name + SUFFIX)
    tags = len(get_arch_pretrained_cfgs(name))
    try:
        model = timm.create_model(name, pretrained=False, device='meta')
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return CoverageRow(name, module, False, 0, twin, tags, f'build: {type(e).__name__}: {e}'[:200])
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())
    if not has_bn:
        return CoverageRow(name, module, False, 0, twin, tags)
    try:
        report = audit(model)
    except Exception as e:  # noqa: BLE001
        return CoverageRow(name, module, True, 0, twin, tags, f'trace: {type(e).__name__}: {e}'[:200])
    checked = check_twin(name, model) if twin else ''
    return CoverageRow(name, module, True, report.bn_merges, twin, tags, twin_check=checked)


def check_twin(name: str, base: nn.Module | None = None, res_drop_rate: float = 0.1, drop_rate: float = 0.1) -> str:
    """The twin's invariants, on the meta device: what is wrong with ``<name>_dropres``, or ``''``.

    Built with ``res_drop_rate`` and head dropout at ``drop_rate`` (0 where the head has no position; the
    package defaults are 0, which would leave nothing active to audit), the twin must have the base's state-dict keys
    and shapes and load the base's state dict strictly (and the base the twin's); the placement audit of one
    train-mode forward pass must find every active dropout ``ok`` (no hazard), each ``ResidualDropout`` at a
    location that ``placement.SITE_LOCATIONS`` allows for its ``where``, and one residual dropout per block
    with a skip path (``residual_blocks``) plus the head's (none where ``families.no_head_position`` says the
    head has no position).

    Args:
        name: the base architecture.
        base: the base already built on the meta device (built here if not given).
        res_drop_rate: the residual rate the twin is built with.
        drop_rate: the head rate the twin is built with, where its head has a position.

    Returns:
        ``''``, or the first problem found.
    """
    try:
        base = base if base is not None else timm.create_model(name, pretrained=False, device='meta')
        head_rate = 0.0 if no_head_position(base) is not None else drop_rate  # CLIP ResNets refuse head dropout
        twin = timm.create_model(name + SUFFIX, pretrained=False, device='meta', res_drop_rate=res_drop_rate,
                                 drop_rate=head_rate)
        sd_twin, sd_base = twin.state_dict(), base.state_dict()
        if list(sd_twin) != list(sd_base) or any(sd_twin[k].shape != sd_base[k].shape for k in sd_base):
            return 'state dict keys or shapes differ from the base'
        twin.load_state_dict(sd_base, strict=True, assign=True)
        base.load_state_dict(sd_twin, strict=True, assign=True)
        sites = dropout_sites(twin)
        blocks = list(residual_blocks(twin))
        head = 0 if no_head_position(twin) is not None else 1  # CLIP ResNets' attention pool: no head dropout
        if len(sites) != len(blocks) + head:
            return f'{len(sites)} dropout modules for {len(blocks)} residual blocks' + (' and the head' if head else '')
        report = audit(twin)
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return f'{type(e).__name__}: {e}'[:200]
    entries = {e.name: e for e in report.entries}
    for site in sites:
        entry = entries.get(site.name)
        if entry is None:
            return f'{site.name} did not run in the traced forward pass'
        if entry.location not in SITE_LOCATIONS[site.where] or entry.hazard:
            return f'{site.name} ({site.where}) audited as {entry.location} / {entry.verdict}: {entry.why}'[:200]
    if report.hazards:
        return f'hazard: {report.hazards[0].name}: {report.hazards[0].note}'[:200]
    return ''


def coverage(names: Iterable[str] | None = None,
             progress: Callable[[int, int, CoverageRow], None] | None = None) -> List[CoverageRow]:
    """Classify every architecture in ``names`` (default: :func:`timm_architectures`).

    Args:
        names: the architectures.
        progress: called after each as ``progress(i, total, row)``.

    Returns:
        One row per architecture, in order.
    """
    names = list(timm_architectures() if names is None else names)
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            rows.append(classify(name))
            if progress is not None:
                progress(i, len(names), rows[-1])
    return rows


def summarize(rows: Sequence[CoverageRow]) -> Dict[str, float]:
    """The coverage figure: BN residual architectures and pretrained tags, and how many have a twin."""
    pop = [r for r in rows if r.bn_residual]
    covered = [r for r in pop if r.twin]
    tags = sum(r.tags for r in pop)
    covered_tags = sum(r.tags for r in covered)
    return dict(architectures=len(rows), bn_residual=len(pop), covered=len(covered),
                fraction=len(covered) / len(pop) if pop else 0.0, tags=tags, covered_tags=covered_tags,
                tag_fraction=covered_tags / tags if tags else 0.0,
                twins_not_bn_residual=sum(r.twin and not r.bn_residual for r in rows),
                twin_problems=sum(bool(r.twin_check) for r in rows),
                errors=sum(bool(r.error) for r in rows))


def format_coverage(rows: Sequence[CoverageRow], command: str = '') -> str:
    """Markdown: the figure, coverage per timm module, and the BN residual architectures without a twin."""
    s = summarize(rows)
    lines = ['# Coverage of timm\'s BatchNorm residual architectures', '']
    if command:
        lines += [f'Generated by `{command}` (timm {timm.__version__}, torch {torch.__version__}).', '']
    lines += [
        f'- timm architectures (deprecated aliases left out): {s["architectures"]}',
        f'- BatchNorm residual architectures (a residual merge with a running-statistics BatchNorm in its branch, '
        f'found by the audit\'s trace): **{s["bn_residual"]}**',
        f'- with a `*_dropres` twin: **{s["covered"]} ({100 * s["fraction"]:.1f} %)**; their pretrained tags: '
        f'**{s["covered_tags"]} of {s["tags"]} ({100 * s["tag_fraction"]:.1f} %)**',
        f'- every twin checked on the meta device (state dict, strict loading both ways, the audit of a train-mode '
        f'pass at `res_drop_rate=0.1` and `drop_rate=0.1` finds every dropout `ok` where `placement.SITE_LOCATIONS` '
        f'puts it): '
        f'{s["twin_problems"]} with a problem',
        f'- twins of architectures not counted as BatchNorm residual: {s["twins_not_bn_residual"]}; '
        f'architectures that could not be built or traced on the meta device: {s["errors"]}',
        '', '| timm module | BN residual | with a twin | without |', '| --- | --- | --- | --- |',
    ]
    by_module: Dict[str, List[CoverageRow]] = defaultdict(list)
    for r in rows:
        if r.bn_residual:
            by_module[r.module].append(r)
    order = sorted(by_module, key=lambda m: (-len(by_module[m]), m))
    for m in order:
        rs = by_module[m]
        missing = [r.name for r in rs if not r.twin]
        shown = ', '.join(f'`{n}`' for n in missing[:6]) + (f', ... ({len(missing)})' if len(missing) > 6 else '')
        lines.append(f'| {m} | {len(rs)} | {sum(r.twin for r in rs)} | {shown} |')
    problems = [r for r in rows if r.twin_check]
    if problems:
        lines += ['', 'Twins with a problem: ' + '; '.join(f'`{r.name}` ({r.twin_check[:100]})' for r in problems)]
    errors = [r for r in rows if r.error]
    if errors:
        lines += ['', 'Not built or traced: ' + '; '.join(f'`{r.name}` ({r.error[:80]})' for r in errors)]
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m timm_dropres.research.coverage [--out MD] [--json JSON] [--names N ...]``."""
    parser = argparse.ArgumentParser(prog='python -m timm_dropres.research.coverage', description=__doc__)
    parser.add_argument('--out', help='write the markdown report here (default: print it)')
    parser.add_argument('--json', help='write one row per architecture here')
    parser.add_argument('--names', nargs='+', help='classify only these architectures')
    args = parser.parse_args(argv)
    for name in args.names or []:
        if not timm.is_model(name):
            parser.error(f'--names: unknown timm architecture {name!r}')
    start = time.monotonic()
    counts: Counter[str] = Counter()

    def progress(i: int, total: int, row: CoverageRow) -> None:
        counts['bn_residual'] += row.bn_residual
        if (i + 1) % 100 == 0 or i + 1 == total:
            print(f'{i + 1}/{total} classified, {counts["bn_residual"]} BN residual, '
                  f'{time.monotonic() - start:.0f} s', file=sys.stderr)

    rows = coverage(args.names, progress)
    command = 'python -m timm_dropres.research.coverage ' + ' '.join(argv if argv is not None else sys.argv[1:])
    text = format_coverage(rows, command.strip())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(summary=summarize(rows), rows=[asdict(r) for r in rows]), f, indent=0)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
