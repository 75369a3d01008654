"""The committed engine studies re-analyse from their committed records into the committed reports."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from timm_dropres.cli.study import main as study_main

REPO = Path(__file__).resolve().parents[2]
STUDIES = ('overfit', 'transfer', 'underfit')


@pytest.mark.parametrize('study', STUDIES)
def test_report_only_remakes_the_committed_report(study, tmp_path, monkeypatch):
    """``dropres-study configs/studies/<study>.yaml --report-only`` on a copy of the committed records writes the
    committed tables byte for byte (the command line in the report included), and a plot. The copy has the
    repository's relative layout, so the report names the same paths."""
    spec_rel = Path('configs/studies') / f'{study}.yaml'
    spec = yaml.safe_load((REPO / spec_rel).read_text())
    out_rel = Path(spec['out_dir'])
    records = sorted((REPO / out_rel / 'records').rglob('*.json'))
    assert records, f'no committed records for {study}'
    (tmp_path / spec_rel).parent.mkdir(parents=True)
    shutil.copy(REPO / spec_rel, tmp_path / spec_rel)
    shutil.copytree(REPO / out_rel / 'records', tmp_path / out_rel / 'records')
    monkeypatch.chdir(tmp_path)
    assert study_main([str(spec_rel), '--report-only']) == 0
    for suffix in ('md', 'csv'):
        made = (tmp_path / out_rel / f"{spec['name']}.{suffix}").read_text()
        assert made == (REPO / out_rel / f"{spec['name']}.{suffix}").read_text(), f'{study}: {suffix} differs'
    assert (tmp_path / out_rel / f"{spec['name']}.png").stat().st_size > 0
    # the report counts every committed record, and all the runs its spec plans
    md = (tmp_path / out_rel / f"{spec['name']}.md").read_text()
    assert f'records: {len(records)} of {len(records)} planned' in md
