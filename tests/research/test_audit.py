"""The placement audit's API, CLI, JSON and docs: known models, state restoration, errors, one vocabulary.

The labelled corpus (every rule, 30+ timm architectures, every ``*_dropres`` variant) is ``test_audit_corpus.py``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn as nn

import timm_dropres
from timm_dropres.cli.audit import main as audit_main
from timm_dropres.research.audit import (
    BRANCH,
    GUIDELINE_LOCATIONS,
    HAZARD,
    HEAD_1X1,
    HEAD_AFTER,
    HEAD_BEFORE,
    LOCATIONS,
    OFF,
    OK,
    TABLE_COLUMNS,
    TERMS,
    VERDICTS,
    AuditError,
    audit,
    describe_rules,
    format_p,
    format_report,
)

SMALL = (3, 64, 64)
ROOT = Path(__file__).resolve().parents[2]


def test_timm_head_dropout_is_after_pooling() -> None:
    r = audit('resnet50', input_size=SMALL, drop_rate=0.2)
    assert len(r.entries) == 1
    e = r.entries[0]
    assert (e.op, e.p, e.location, e.verdict, e.hazard) == ('F.dropout', 0.2, HEAD_AFTER, OFF, False)
    assert 'forward_head' in e.name and not r.hazards and not r.compliant


@pytest.mark.parametrize('name', ['resnet50_dropres', 'resnetv2_50_dropres'])
def test_dropres_variants_are_compliant(name: str) -> None:
    r = audit(name, input_size=SMALL)
    sites = timm_dropres.dropout_sites(timm.create_model(name))
    assert [e.name for e in r.entries] == [s.name for s in sites]   # every module found, in execution order
    assert r.compliant and not r.hazards
    assert r.entries[-1].location == HEAD_BEFORE
    assert all(e.location == BRANCH for e in r.entries[:-1])


def test_post_act_before_last_conv_is_reported_as_hazard(capsys) -> None:
    r = audit('resnet18_dropres', input_size=SMALL, res_drop_pos='before_last_conv', res_drop_rate=0.1)
    branch = r.entries[:-1]
    assert branch and all(e.verdict == HAZARD and e.consumer.endswith('bn2') for e in branch)
    assert 'linear:' in branch[0].path and branch[0].path.endswith('bn2')   # dropout -> conv2 -> bn2
    assert audit_main(['resnet18_dropres', '--res-drop-pos', 'before_last_conv', '--res-drop-rate', '0.1',
                       '--input-size', '3', '64', '64', '--strict']) == 1
    assert 'hazard' in capsys.readouterr().err
    assert audit_main(['resnet18_dropres', '--input-size', '3', '64', '64', '--strict']) == 0


def test_inactive_dropout_is_listed_but_not_a_hazard() -> None:
    r = audit('resnet18_dropres', input_size=SMALL, res_drop_pos='before_last_conv', res_drop_rate=0.0, drop_rate=0.1)
    assert all(e.hazard for e in r.entries[:-1]) and not r.hazards
    assert '0 (inactive)' in format_report(r)
    assert r.summary() == {OK: 1, HAZARD: 0, OFF: 0}                 # the summary counts active ops only


def test_audit_restores_model_state() -> None:
    model = timm.create_model('test_resnet_dropres').eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    audit(model, input_size=(3, 32, 32))
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert torch.equal(rng, torch.get_rng_state())
    out = model(torch.randn(2, 3, 32, 32))                            # no hook left behind, still a plain model
    assert isinstance(out, torch.Tensor) and out.shape == (2, model.num_classes)


def test_default_input_size_comes_from_timm_data_config() -> None:
    r = audit('test_resnet_dropres')
    cfg = timm.data.resolve_model_data_config(timm.create_model('test_resnet_dropres'))
    assert r.input_shape == (2, *cfg['input_size'])
    # create_model keywords that change the input are taken into account
    r = audit('vit_tiny_patch16_224', img_size=32, depth=1)
    assert r.input_shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------
# the table and --json carry the same fields
# ----------------------------------------------------------------------------------------------------------

def _parse_table(text: str) -> List[Dict[str, str]]:
    """The table's rows as dicts keyed like TABLE_COLUMNS, sliced at the header's column offsets."""
    lines = text.splitlines()
    header = lines[1]
    starts, pos = [], 0
    for _, title in TABLE_COLUMNS:
        pos = header.index(title, pos)
        starts.append(pos)
        pos += len(title)
    rows = []
    for line in lines[2:]:
        if line.startswith(('summary:', 'no BatchNorm')):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line)], strict=True)]
        rows.append(dict(zip([key for key, _ in TABLE_COLUMNS], cells, strict=True)))
    return rows


def test_json_has_the_table_fields(tmp_path, capsys) -> None:
    out = tmp_path / 'a.json'
    args = ['resnet18', '--drop-block-rate', '0.1', '--drop-path-rate', '0.05', '--drop-rate', '0.2',
            '--input-size', '3', '64', '64', '--json', str(out)]
    assert audit_main(args) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = _parse_table(text)
    assert data['columns'] == [key for key, _ in TABLE_COLUMNS]
    assert len(rows) == len(data['entries']) == 12
    for row, entry in zip(rows, data['entries'], strict=True):
        p = format_p(entry['p']) + ('' if entry['active'] else ' (inactive)')
        assert row == dict(index=str(entry['index']), op=entry['op'], name=entry['name'], p=p,
                           location=entry['location'], verdict=entry['verdict'], why=entry['why'])
        assert entry['location'] in LOCATIONS and entry['verdict'] in VERDICTS
        assert entry['hazard'] == (entry['verdict'] == HAZARD) and (entry['consumer'] is None) != entry['hazard']
    summary = re.search(r'summary: (\d+) ok, (\d+) hazard, (\d+) off-guideline', text).groups()
    assert data['summary'] == {OK: int(summary[0]), HAZARD: int(summary[1]), OFF: int(summary[2])}
    assert data['hazards'] == data['summary'][HAZARD] == 4 and data['input_shape'] == [2, 3, 64, 64]
    # a JSON file that cannot be written is one error line, exit code 2
    assert audit_main(args[:-1] + [str(tmp_path / 'missing' / 'a.json')]) == 2
    assert 'cannot write --json' in capsys.readouterr().err


@pytest.mark.parametrize('name, n_drop_blocks', [('resnet51q', 10), ('skresnet18', 8)])
def test_cli_sees_dropblock_inside_norm_modules(name: str, n_drop_blocks: int, tmp_path, capsys) -> None:
    """Issue 11: DropBlock in BatchNormAct2d(drop_layer=...) was invisible and --strict passed."""
    out = tmp_path / 'a.json'
    code = audit_main([name, '--drop-block-rate', '0.1', '--input-size', '3', '64', '64', '--strict',
                       '--json', str(out)])
    assert code == 1 and 'variance-shift hazard' in capsys.readouterr().err
    blocks = [e for e in json.loads(out.read_text())['entries'] if e['op'] == 'DropBlock2d']
    assert len(blocks) == n_drop_blocks and all(e['verdict'] == HAZARD for e in blocks)
    assert all('.bn.drop' in e['name'] and e['consumer'].endswith('.bn') for e in blocks)


def test_local_dir_and_json(tmp_path) -> None:
    from timm_dropres.models.hf_folder import save_pretrained_folder
    folder = save_pretrained_folder(timm.create_model('test_resnet_dropres', num_classes=3), tmp_path / 'm')
    out = tmp_path / 'a.json'
    assert audit_main([f'local-dir:{folder}', '--input-size', '3', '32', '32', '--json', str(out), '--strict']) == 0
    data = json.loads(out.read_text())
    assert data['hazards'] == 0 and len(data['entries']) == 5


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------

class _NeedsTwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


def test_clear_errors(capsys) -> None:
    with pytest.raises(AuditError, match=r"_NeedsTwoInputs.forward\(x, y\) needs inputs \['x', 'y'\].*one image"):
        audit(_NeedsTwoInputs(), input_size=(3, 8, 8))
    with pytest.raises(AuditError, match='could not trace _TokenModel: .*raised RuntimeError.*input_size'):
        audit(_TokenModel(), input_size=(3, 8, 8))                  # float image into an embedding: one line
    with pytest.raises(AuditError, match='could not trace ResNet.*input_size'):
        audit(timm.create_model('test_resnet'), input_size=(1, 32, 32))   # wrong channel count
    with pytest.raises(AuditError, match=r"keywords \['drop_rate'\] only apply to a timm model name"):
        audit(_NeedsTwoInputs(), drop_rate=0.1)
    with pytest.raises(AuditError, match=r'input_size must be \(C, H, W\).*got \(3, 8\)'):
        audit('test_resnet', input_size=(3, 8))
    with pytest.raises(AuditError, match='batch_size must be >= 2.*got 1'):
        audit('test_resnet', batch_size=1)
    with pytest.raises(AuditError, match="unknown model 'resnet_does_not_exist'"):
        audit('resnet_does_not_exist')
    assert audit_main(['no_such_model_xyz']) == 2
    err = capsys.readouterr().err
    assert 'unknown model' in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1
    assert audit_main([f'local-dir:{"/nonexistent"}']) == 2
    assert 'config.json' in capsys.readouterr().err
    with pytest.raises(AuditError, match=r"unknown model 'resnet50_dropress'.*closest names: \['resnet50_dropres'"):
        audit('resnet50_dropress')  # the closest names, not the first *resnet50* ones alphabetically


def test_hf_hub_models_are_built_or_the_real_reason_is_given(tmp_path, monkeypatch):
    """The refusal used to be a hard-coded 'the Hub is not reachable here', whatever happened."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))  # an empty cache: nothing to read offline
    with pytest.raises(AuditError, match=r"could not build 'hf-hub:nobody/nothing': \w+: .*local cache when "
                                         r'HF_HUB_OFFLINE=1'):
        audit('hf-hub:nobody/nothing')


# ----------------------------------------------------------------------------------------------------------
# one vocabulary: the library's definitions are the CLI's and the docs'
# ----------------------------------------------------------------------------------------------------------

def _md_table_rows(text: str) -> Dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r'^\| `([^`]+)` \| (.+?) \|$', text, re.M)}


def test_docs_state_each_rule_once_and_as_the_code_does() -> None:
    placement = (ROOT / 'docs' / 'placement.md').read_text()
    rows = _md_table_rows(placement)
    for vocabulary in (VERDICTS, LOCATIONS, TERMS):
        for label, rule in vocabulary.items():
            assert rows.get(label) == rule, f'docs/placement.md: the rule for {label!r} differs from the code'
            assert placement.count(f'| `{label}` |') == 1
    assert set(GUIDELINE_LOCATIONS) <= set(LOCATIONS)
    # the other docs refer to placement.md instead of restating the rules
    for doc in ('README.md', 'docs/analysis.md'):
        text = (ROOT / doc).read_text()
        assert 'docs/placement.md' in text or 'placement.md' in text
        assert not set(_md_table_rows(text)) & (set(VERDICTS) | set(LOCATIONS))


def test_cli_help_shows_the_rules(capsys) -> None:
    with pytest.raises(SystemExit):
        audit_main(['--help'])
    out = capsys.readouterr().out
    assert all(rule.split(';')[0][:40] in ' '.join(out.split()) for rule in VERDICTS.values())
    assert all(label in out for label in LOCATIONS)
    assert describe_rules().splitlines()[0] in out


def test_readme_claims_match_the_audit() -> None:
    """Each sentence of the README's audit section, against the audit (the corpus covers every variant)."""
    readme = (ROOT / 'README.md').read_text()
    section = ' '.join(readme[readme.index('## Check the claim on your own model'):].split())
    claims = {
        '"head, after pooling" (`off-guideline`)':
            (audit('resnet18', input_size=SMALL, drop_rate=0.2), HEAD_AFTER, OFF),
        'a 1x1 final map (e.g. a ResNet at 32x32), where before and after pooling are the same point (`ok`)':
            (audit('resnet18', input_size=(3, 32, 32), drop_rate=0.2), HEAD_1X1, OK),
        "post-activation `res_drop_pos='before_last_conv'`, which is reported as a hazard":
            (audit('resnet18_dropres', input_size=SMALL, res_drop_pos='before_last_conv'), BRANCH, HAZARD),
    }
    for sentence, (report, location, verdict) in claims.items():
        assert sentence in section
        assert (report.entries[0].location, report.entries[0].verdict) == (location, verdict), sentence
    assert 'The `*_dropres` models are all `ok`' in section
    assert audit('resnet18_dropres', input_size=SMALL).compliant
