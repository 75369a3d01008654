"""The placement audit on known models: timm's after-pool dropout, our variants, hand-built hazards."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

import timm_dropres
from timm_dropres.audit import HAZARD, HEAD_AFTER, HEAD_BEFORE, MAIN, OFF, OK, AuditError, audit, format_report
from timm_dropres.cli.audit import main as audit_main

SMALL = (3, 64, 64)


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
    assert all(e.location == 'residual branch' for e in r.entries[:-1])


def test_post_act_before_last_conv_is_reported_as_hazard(capsys) -> None:
    r = audit('resnet18_dropres', input_size=SMALL, res_drop_pos='before_last_conv')
    branch = r.entries[:-1]
    assert branch and all(e.verdict == HAZARD and e.consumer.endswith('bn2') for e in branch)
    assert 'linear:' in branch[0].path and branch[0].path.endswith('bn2')   # dropout -> conv2 -> bn2
    assert audit_main(['resnet18_dropres', '--res-drop-pos', 'before_last_conv', '--input-size', '3', '64', '64',
                       '--strict']) == 1
    assert 'hazard' in capsys.readouterr().err
    assert audit_main(['resnet18_dropres', '--input-size', '3', '64', '64', '--strict']) == 0


class _Block(nn.Module):
    """A hand-built residual block with a dropout at a chosen spot."""

    def __init__(self, where: str, functional: bool = False) -> None:
        super().__init__()
        self.where, self.functional = where, functional
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.drop_path = DropPath(0.1)

    def _d(self, here: str, x: torch.Tensor) -> torch.Tensor:
        if here != self.where:
            return x
        return F.dropout(x, 0.2, self.training) if self.functional else self.drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(self._d('before_conv2', h)))
        h = self.drop_path(self._d('after_bn2', h))
        return self._d('after_add', F.relu(x + h))


class _Net(nn.Module):
    def __init__(self, where: str, functional: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(where, functional), _Block('none'))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize('functional', [False, True], ids=['module', 'functional'])
def test_hand_built_placements(functional: bool) -> None:
    hazard = audit(_Net('before_conv2', functional), input_size=(3, 8, 8))
    drops = [e for e in hazard.entries if e.op != 'DropPath']
    assert len(drops) == 1 and drops[0].verdict == HAZARD and drops[0].consumer == 'blocks.0.bn2'
    if functional:
        assert drops[0].op == 'F.dropout' and '_Block._d' in drops[0].name
    ok = audit(_Net('after_bn2', functional), input_size=(3, 8, 8))
    assert [e.verdict for e in ok.entries] == [OK, OK, OK]                       # dropout + both DropPaths
    assert {e.op for e in ok.entries} == {'DropPath', 'F.dropout' if functional else 'Dropout'}
    main = audit(_Net('after_add', functional), input_size=(3, 8, 8))
    e = [e for e in main.entries if e.op != 'DropPath'][0]
    assert e.location == MAIN and e.verdict == HAZARD and e.consumer == 'blocks.1.bn1'   # next block's conv1 -> bn1


def test_inactive_dropout_is_listed_but_not_a_hazard() -> None:
    r = audit('resnet18_dropres', input_size=SMALL, res_drop_pos='before_last_conv', res_drop_rate=0.0)
    assert all(e.hazard for e in r.entries[:-1]) and not r.hazards
    assert '0 (inactive)' in format_report(r)


def test_audit_restores_model_state() -> None:
    model = timm.create_model('test_resnet_dropres').eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit(model, input_size=(3, 32, 32))
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_local_dir_and_json(tmp_path) -> None:
    from timm_dropres.export import save_pretrained_folder
    folder = save_pretrained_folder(timm.create_model('test_resnet_dropres', num_classes=3), tmp_path / 'm')
    out = tmp_path / 'a.json'
    assert audit_main([f'local-dir:{folder}', '--input-size', '3', '32', '32', '--json', str(out), '--strict']) == 0
    data = json.loads(out.read_text())
    assert data['hazards'] == 0 and len(data['entries']) == 5


class _NeedsTwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


def test_clear_errors(capsys) -> None:
    with pytest.raises(AuditError, match='could not trace _NeedsTwoInputs.*input_size'):
        audit(_NeedsTwoInputs(), input_size=(3, 8, 8))
    with pytest.raises(AuditError, match="unknown model 'resnet_does_not_exist'"):
        audit('resnet_does_not_exist')
    assert audit_main(['no_such_model_xyz']) == 2
    err = capsys.readouterr().err
    assert 'unknown model' in err and 'Traceback' not in err
    assert audit_main([f'local-dir:{"/nonexistent"}']) == 2
    assert 'config.json' in capsys.readouterr().err
