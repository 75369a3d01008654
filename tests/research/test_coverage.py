"""The coverage count (research/coverage.py) on a few architectures, and the committed result against the registry
and the README: the figure is the code's, and every twin passed the meta-device check when it was made."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm

import timm_dropres
from timm_dropres.models.dropres import SUFFIX
from timm_dropres.research.coverage import check_twin, classify, summarize, timm_architectures

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / 'docs' / 'results' / 'coverage.json'


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.mark.parametrize('name, bn_residual', [
    ('resnet18', True), ('efficientnet_b0', True), ('dla34', True),
    ('vgg11_bn', False),          # BatchNorm, no residual merge
    ('convnext_atto', False),     # residual merges, LayerNorm only
    ('mobilenetv1_100', False),   # BatchNorm, no skip path
    ('resnet50_gn', False),       # GroupNorm
])
def test_classify(name, bn_residual):
    row = classify(name)
    assert row.bn_residual is bn_residual and not row.error
    assert row.twin == timm.is_model(name + SUFFIX)
    assert row.twin_check == ''


def test_check_twin_finds_a_misplaced_dropout(monkeypatch):
    """The meta-device check fails when a twin's residual dropout sits where a BatchNorm reads it: MobileOne
    calls its drop path in blocks without an identity too, where the output goes on to the next block's BN."""
    from timm_dropres.models import families
    assert check_twin('mobileone_s0') == '' and check_twin('coatnet_nano_rw_224') == ''
    monkeypatch.setitem(families.MERGE_SLOTS, timm.models.byobnet.MobileOneBlock,
                        families.Slot('compose', 'drop_path', lambda b: b.reparam_conv is None))
    assert 'audited as stem / hazard' in check_twin('mobileone_s0')  # the stem is a MobileOne block


def test_committed_result_is_current_and_the_readme_quotes_it():
    data = json.loads(RESULT.read_text())
    rows = data['rows']
    assert data['summary'] == summarize([_Row(r) for r in rows])
    assert {r['name'] for r in rows} == set(timm_architectures())
    assert {r['name'] for r in rows if r['twin']} == {
        n[:-len(SUFFIX)] for n in timm_dropres.models.dropres.mirrored_models()}
    assert not [r['name'] for r in rows if r['twin_check'] or r['error']]
    s = data['summary']
    assert s['fraction'] >= 0.9  # issue 21's goal
    named = ['efficientnet_b0', 'mobilenetv3_large_100', 'regnety_032', 'resnest50d', 'dla34', 'cspresnet50',
             'res2net50_26w_4s', 'hrnet_w18', 'repvgg_a2']
    assert all(r['twin'] and r['bn_merges'] > 0 for r in rows if r['name'] in named)
    readme = ' '.join((ROOT / 'README.md').read_text().split())
    figure = (f"{s['covered']} of timm's {s['bn_residual']} BatchNorm residual architectures "
              f"({100 * s['fraction']:.1f} %)")
    assert figure in readme
    assert f"{s['covered_tags']} of their {s['tags']} pretrained tags" in readme
    assert re.search(rf"lists {len(timm_dropres.models.dropres.mirrored_models())} architectures", readme)


class _Row:
    """A committed row with the properties summarize() reads."""

    def __init__(self, row: dict) -> None:
        self.__dict__.update(row)

    @property
    def bn_residual(self) -> bool:
        return self.bn_merges > 0
