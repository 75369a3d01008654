"""The placement audit against a labelled corpus: timm architectures, every ``*_dropres`` variant, hand-built rules.

Every expectation below was written from the model's own source (timm 1.0.31: ``timm/models/<family>.py``,
``timm/layers``), never copied from the audit's output: which op runs where, what the next BatchNorm, residual
merge or global pool is. Comments name the code that decides each verdict. Counts that depend on a model's
configuration are read off the model's modules (block attributes such as ``has_skip``), not off the trace.
The rules themselves (locations, verdicts) are those of ``docs/placement.md``.

The corpus passes with zero misses (a site not found, or found with another location / verdict / consumer)
and zero false hazards. Speed: one thread, tiny inputs, each model built and traced once; the ``*_dropres``
sweep builds reduced-width variants (same blocks and depths, 32 channels per stage).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, DropBlock2d, DropPath, drop_block_2d, drop_path
from timm.models import cspnet, regnet
from timm.models import resnet as timm_resnet
from timm.models import resnetv2 as timm_resnetv2

import timm_dropres
from timm_dropres.research.audit import (
    BODY,
    BRANCH,
    HAZARD,
    HEAD,
    HEAD_1X1,
    HEAD_AFTER,
    HEAD_BEFORE,
    MAIN,
    OFF,
    OK,
    SHORTCUT,
    STEM,
    UNUSED,
    AuditReport,
    audit,
)

# ----------------------------------------------------------------------------------------------------------
# expectation format and checker
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Expected audit rows: every entry whose name fully matches ``pattern``.

    ``consumer`` is a template filled with the pattern's groups (``'{0}.bn3'``) or a function of the match.
    ``count`` is the exact number of matching entries (an int, or a function of the built model).
    """

    pattern: str
    op: str
    location: str
    verdict: str
    count: int | Callable[[nn.Module], int] = 1
    consumer: str | Callable[[re.Match], str] | None = None
    active: bool = True


@dataclass
class Case:
    """One corpus entry: how to build the model, its input, and the expected rows for every dropout site."""

    id: str
    family: str
    build: Callable[[], nn.Module]
    input_size: Tuple[int, int, int] | None
    sites: Sequence[Site] | Callable[[nn.Module], Sequence[Site]]
    has_bn: bool = True
    tags: Tuple[str, ...] = field(default=())


def check(report: AuditReport, sites: Sequence[Site], model: nn.Module) -> List[str]:
    """Every problem of ``report`` against ``sites``: misses, wrong labels, false hazards, count mismatches."""
    problems: List[str] = []
    seen: Counter[int] = Counter()
    for e in report.entries:
        matches = [(i, s, m) for i, s in enumerate(sites) if (m := re.fullmatch(s.pattern, e.name))]
        if len(matches) != 1:
            problems.append(f'{e.name!r} ({e.op}, {e.location}, {e.verdict}): matches {len(matches)} expected sites')
            continue
        i, s, m = matches[0]
        seen[i] += 1
        got = (e.op, e.location, e.verdict, e.active)
        want = (s.op, s.location, s.verdict, s.active)
        if got != want:
            kind = 'FALSE HAZARD' if e.verdict == HAZARD != s.verdict else 'MISS' if s.verdict == HAZARD else 'wrong'
            problems.append(f'{kind}: {e.name}: got {got}, want {want}')
        if s.consumer is not None:
            consumer = s.consumer(m) if callable(s.consumer) else s.consumer.format(*m.groups())
            if e.consumer != consumer:
                problems.append(f'{e.name}: consumer {e.consumer!r}, want {consumer!r}')
    for i, s in enumerate(sites):
        want = s.count(model) if callable(s.count) else s.count
        if seen[i] != want:
            problems.append(f'MISS: {s.pattern!r}: {seen[i]} row(s), want {want}')
    return problems


def _count(model: nn.Module, pred: Callable[[nn.Module], bool]) -> int:
    return sum(bool(pred(m)) for m in model.modules())


def _first_bn(module: nn.Module, prefix: str) -> str:
    """The first BatchNorm registered in ``module`` (registration order == execution order for these blocks)."""
    return next(f'{prefix}.{n}' for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d))


def _dp(model: nn.Module) -> int:
    """Number of DropPath modules (for models that call every one they build)."""
    return _count(model, lambda x: isinstance(x, DropPath))


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


HEAD_DROPOUT = Site(r'head\.drop', 'Dropout', HEAD_AFTER, OFF)                 # timm ClassifierHead: pool -> drop -> fc
RATES = dict(drop_rate=0.2, drop_path_rate=0.1)


# ----------------------------------------------------------------------------------------------------------
# timm architectures
# ----------------------------------------------------------------------------------------------------------

def _resnet_sites(basic: bool, blocks: int, db_blocks: int, cls: str = 'ResNet') -> List[Site]:
    # resnet.py BasicBlock: bn1 -> drop_block -> act1 -> conv2 -> bn2; Bottleneck: bn2 -> drop_block -> conv3 -> bn3.
    # drop_blocks() puts DropBlock in layer3/4 only; stochastic depth is 0 for the first block (no DropPath).
    return [
        Site(r'(layer[34]\.\d+)\.drop_block', 'DropBlock2d', BRANCH, HAZARD, db_blocks,
             '{0}.bn2' if basic else '{0}.bn3'),
        Site(r'layer\d\.\d+\.drop_path', 'DropPath', BRANCH, OK, blocks - 1),     # after bn(+se), before x += shortcut
        Site(rf'F\.dropout @ {cls}\.forward_head', 'F.dropout', HEAD_AFTER, OFF),  # forward_head: pool -> F.dropout
    ]


def _efficientnet_sites(head: str) -> List[Site]:
    # _efficientnet_blocks.py: bn3 (or bn2) -> drop_path -> + shortcut, only `if self.has_skip`; the builder gives
    # block 0 rate 0 (nn.Identity). forward_head: global_pool (-> conv_head -> act) -> F.dropout -> classifier.
    def skips(m: nn.Module) -> int:
        return _count(m, lambda b: getattr(b, 'has_skip', False)
                      and isinstance(getattr(b, 'drop_path', None), DropPath))
    return [Site(r'blocks\.\d+\.\d+\.drop_path', 'DropPath', BRANCH, OK, skips),
            Site(rf'F\.dropout @ {head}\.forward_head', 'F.dropout', HEAD_AFTER, OFF)]


def _vit_sites(active_inner: bool, heads: int, depth: int = 12) -> List[Site]:
    # vision_transformer.py: pos_drop before the first block; Block: x + drop_path1(ls1(attn(norm1(x)))); Attention:
    # qkv -> F.scaled_dot_product_attention(dropout_p=attn_drop.p) -> proj -> proj_drop; Mlp: fc1 -> act -> drop1
    # -> fc2 -> drop2. forward_head: x[:, 0] (token pool) -> fc_norm -> head_drop. LayerNorm only: no hazard.
    sdpa = r'blocks\.\d+\.attn: F\.scaled_dot_product_attention\(dropout_p\) @ Attention\.forward'
    return [
        Site(r'pos_drop', 'Dropout', STEM, OFF, active=active_inner),
        Site(sdpa, 'F.sdpa dropout', BRANCH, OK, depth, active=active_inner),
        Site(r'blocks\.\d+\.attn\.proj_drop', 'Dropout', BRANCH, OK, depth, active=active_inner),
        Site(r'blocks\.\d+\.mlp\.drop[12]', 'Dropout', BRANCH, OK, 2 * depth, active=active_inner),
        Site(r'blocks\.\d+\.drop_path[12]', 'DropPath', BRANCH, OK, 2 * (depth - 1)),
        Site(r'head_drop', 'Dropout', HEAD_AFTER, OFF, heads),
    ]


def _densenet_consumer(m: re.Match) -> str:
    # densenet.py: DenseLayer: norm2 -> conv2 -> F.dropout; the output is concatenated and the next layer starts
    # with norm1 (BN); after a block's last layer, the transition's norm, after the last block, features.norm5.
    block, layer = int(m.group(2)), int(m.group(3))
    if layer < (6, 12, 24, 16)[block - 1]:
        return f'features.denseblock{block}.denselayer{layer + 1}.norm1'
    return f'features.transition{block}.norm' if block < 4 else 'features.norm5'


def _repvgg_sites(m: nn.Module) -> List[Site]:
    # byobnet.py RepVggBlock: DropBlock sits in conv_kxk.bn (BN -> drop, apply_act=False), then
    # x = conv_1x1(x) + conv_kxk(x) (two parallel branches: no residual merge); identity blocks go on with
    # drop_path -> x += identity (BN(x): the skip); others -> act -> next block, whose identity BN reads it.
    # drop_blocks() covers the last two stages. stages.3 has one block, then ClassifierHead pools its output.
    def ident(s: int, b: int) -> bool:
        return m.stages[s][b].identity is not None
    stage2 = len(m.stages[2])
    assert not ident(2, 0) and all(ident(2, b) for b in range(1, stage2)) and len(m.stages[3]) == 1
    return [
        Site(r'stages\.2\.0\.conv_kxk\.bn\.drop', 'DropBlock2d', MAIN, HAZARD, 1, 'stages.2.1.identity'),
        Site(r'stages\.2\.([1-9]\d*)\.conv_kxk\.bn\.drop', 'DropBlock2d', BRANCH, OK, stage2 - 1),
        Site(r'stages\.3\.0\.conv_kxk\.bn\.drop', 'DropBlock2d', HEAD_BEFORE, OK),
        # DropPath exists only where use_ident: before x += identity
        Site(r'stages\.\d\.\d+\.drop_path', 'DropPath', BRANCH, OK, _dp),
        HEAD_DROPOUT,
    ]


def _rexnet_sites(m: nn.Module) -> List[Site]:
    # rexnet.py LinearBottleneck: if use_shortcut (stride 1, in <= out): x = drop_path(x);
    # x = cat([x[:, :in] + shortcut, x[:, in:]]). When out > in the extra channels bypass the residual merge and
    # reach the next block's first BN: a hazard. When out == in the slice is empty: a plain residual branch.
    blocks = [(i, b) for i, b in enumerate(m.features)
              if getattr(b, 'use_shortcut', False) and b.drop_path is not None]
    widen = '|'.join(str(i) for i, b in blocks if b.out_channels > b.in_channels)
    same = '|'.join(str(i) for i, b in blocks if b.out_channels == b.in_channels)
    sites = [HEAD_DROPOUT]
    if widen:
        sites.append(Site(rf'features\.({widen})\.drop_path', 'DropPath', BRANCH, HAZARD, len(widen.split('|')),
                          lambda mt: _first_bn(m.features[int(mt.group(1)) + 1], f'features.{int(mt.group(1)) + 1}')))
    if same:
        sites.append(Site(rf'features\.({same})\.drop_path', 'DropPath', BRANCH, OK, len(same.split('|'))))
    return sites


def _vovnet_sites(m: nn.Module) -> List[Site]:
    # vovnet.py OsaBlock: ... conv_concat -> attn -> drop_path -> (x + identity only if residual).
    # ese_vovnet19b_dw has residual=False: the dropped block output feeds the next stage's first BN directly;
    # after the last stage comes ClassifierHead (pool): no BN, no weight layer in between.
    assert not any(s.blocks[0].residual for s in m.stages)
    return [
        Site(r'stages\.([12])\.blocks\.0\.drop_path', 'DropPath', BODY, HAZARD, 2,
             lambda mt: _first_bn(m.stages[int(mt.group(1)) + 1].blocks[0],
                                  f'stages.{int(mt.group(1)) + 1}.blocks.0')),
        Site(r'stages\.3\.blocks\.0\.drop_path', 'DropPath', HEAD_BEFORE, OK),
        HEAD_DROPOUT,
    ]


def _levit_sites(m: nn.Module) -> List[Site]:
    # levit.py: LevitBlock: x + drop_path1(attn(x)), attn.proj = act -> LinearNorm (linear -> BatchNorm1d);
    # x + drop_path2(mlp(x)); LevitMlp: ln1 -> act -> drop (p=0, no knob) -> ln2 = linear -> BN: an inactive hazard.
    # Head (distilled): x.mean(1) -> NormLinear (bn -> drop -> linear) twice; at 128 px 2x2 tokens are left.
    return [
        Site(r'stages\.\d\.blocks\.\d+\.drop_path[12]', 'DropPath', BRANCH, OK,
             lambda mm: 2 * sum(len(s.blocks) for s in mm.stages)),
        Site(r'stages\.\d\.downsample\.drop_path', 'DropPath', BRANCH, OK,
             lambda mm: sum(not isinstance(s.downsample, nn.Identity) for s in mm.stages)),
        Site(r'(stages\.\d\.(?:blocks\.\d+|downsample)\.mlp)\.drop', 'Dropout', BRANCH, HAZARD,
             lambda mm: _count(mm, lambda x: type(x).__name__ == 'LevitMlp'), '{0}.ln2.bn', active=False),
        Site(r'head(_dist)?\.drop', 'Dropout', HEAD_AFTER, OFF, 2),
    ]


TIMM_CASES: List[Case] = [
    Case('resnet18', 'resnet', _timm('resnet18', drop_block_rate=0.1, **RATES), (3, 64, 64),
         _resnet_sites(basic=True, blocks=8, db_blocks=4)),
    Case('resnet50', 'resnet', _timm('resnet50', drop_block_rate=0.1, **RATES), (3, 64, 64),
         _resnet_sites(basic=False, blocks=16, db_blocks=9)),
    Case('resnet18@32px', 'resnet', _timm('resnet18', drop_rate=0.2), (3, 32, 32),
         # the final map is 1x1: timm's after-pool dropout is at the same point as a before-pool one
         [Site(r'F\.dropout @ ResNet\.forward_head', 'F.dropout', HEAD_1X1, OK)]),
    Case('seresnext26d_32x4d', 'seresnext', _timm('seresnext26d_32x4d', drop_block_rate=0.1, **RATES), (3, 64, 64),
         _resnet_sites(basic=False, blocks=8, db_blocks=4)),
    Case('resnetv2_50', 'resnetv2', _timm('resnetv2_50', **RATES), (3, 64, 64),
         # PreActBottleneck: conv3(norm3(x)) -> drop_path -> x + shortcut; final norm, then ClassifierHead
         [Site(r'stages\.\d\.blocks\.\d+\.drop_path', 'DropPath', BRANCH, OK, 15), HEAD_DROPOUT]),
    Case('regnetx_002', 'regnet', _timm('regnetx_002', **RATES), (3, 64, 64),
         # regnet.py Bottleneck: conv3 (conv -> BN) -> drop_path(x) + downsample(shortcut)
         [Site(r's\d\.b\d+\.drop_path', 'DropPath', BRANCH, OK, _dp), HEAD_DROPOUT]),
    Case('regnety_002', 'regnet', _timm('regnety_002', **RATES), (3, 64, 64),
         [Site(r's\d\.b\d+\.drop_path', 'DropPath', BRANCH, OK, _dp), HEAD_DROPOUT]),
    Case('efficientnet_b0', 'efficientnet', _timm('efficientnet_b0', **RATES), (3, 64, 64),
         _efficientnet_sites('EfficientNet')),
    Case('mnasnet_small', 'efficientnet', _timm('mnasnet_small', **RATES), (3, 64, 64),
         _efficientnet_sites('EfficientNet')),
    Case('mobilenetv3_small_050', 'mobilenetv3', _timm('mobilenetv3_small_050', **RATES), (3, 64, 64),
         _efficientnet_sites('MobileNetV3')),
    Case('lcnet_050', 'mobilenetv3', _timm('lcnet_050', drop_rate=0.2), (3, 64, 64),
         # 'dsa' blocks have no skip; pool -> conv_head -> act -> flatten -> F.dropout
         [Site(r'F\.dropout @ MobileNetV3\.forward_head', 'F.dropout', HEAD_AFTER, OFF)]),
    Case('convnext_atto', 'convnext', _timm('convnext_atto', **RATES), (3, 64, 64),
         # ConvNeXtBlock: dw conv -> LayerNorm -> Mlp (drop1/drop2 built with p=0) -> gamma -> drop_path + shortcut;
         # NormMlpClassifierHead: pool -> norm -> flatten -> drop -> fc. LayerNorm only: no hazard possible.
         [Site(r'stages\.\d\.blocks\.\d+\.drop_path', 'DropPath', BRANCH, OK, 11),
          Site(r'stages\.\d\.blocks\.\d+\.mlp\.drop[12]', 'Dropout', BRANCH, OK, 24, active=False),
          HEAD_DROPOUT], has_bn=False),
    Case('vit_tiny_patch16_224', 'vit',
         _timm('vit_tiny_patch16_224', img_size=32, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, **RATES),
         (3, 32, 32), _vit_sites(active_inner=True, heads=1), has_bn=False),
    Case('deit_tiny_distilled_patch16_224', 'deit', _timm('deit_tiny_distilled_patch16_224', img_size=32, **RATES),
         # deit.py forward_head: x[:, 0], x[:, 1] -> head_drop each -> head / head_dist -> (x + x_dist) / 2
         (3, 32, 32), _vit_sites(active_inner=False, heads=2), has_bn=False),
    Case('levit_128s', 'levit', _timm('levit_128s', img_size=128, **RATES), (3, 128, 128), _levit_sites),
    Case('densenet121', 'densenet', _timm('densenet121', drop_rate=0.2, proj_drop_rate=0.1), (3, 64, 64),
         [Site(r'(features\.denseblock(\d)\.denselayer(\d+)): F\.dropout @ DenseLayer\.forward', 'F.dropout', BODY,
               HAZARD, 58, _densenet_consumer),
          Site(r'head_drop', 'Dropout', HEAD_AFTER, OFF)]),                    # global_pool -> head_drop -> classifier
    Case('resnet51q', 'byobnet', _timm('resnet51q', drop_block_rate=0.1, **RATES), (3, 64, 64),
         # byobnet.py BottleneckBlock: conv2_kxk = ConvNormAct(drop_layer=DropBlock): BN -> drop -> act, then
         # conv3_1x1 (conv -> BN); drop_path before x + shortcut. DropBlock in the last two stages (d=6, 4).
         [Site(r'(stages\.[23]\.\d)\.conv2_kxk\.bn\.drop', 'DropBlock2d', BRANCH, HAZARD, 10, '{0}.conv3_1x1.bn'),
          Site(r'stages\.\d\.\d\.drop_path', 'DropPath', BRANCH, OK, 15), HEAD_DROPOUT]),
    Case('repvgg_a0', 'byobnet', _timm('repvgg_a0', drop_block_rate=0.1, **RATES), (3, 64, 64), _repvgg_sites),
    Case('mobileone_s0', 'byobnet', _timm('mobileone_s0', **RATES), (3, 64, 64),
         # MobileOneBlock: sum of conv branches -> drop_path -> out += identity (BN), DropPath only if use_ident
         [Site(r'stages\.\d\.\d+\.drop_path', 'DropPath', BRANCH, OK, _dp), HEAD_DROPOUT]),
    Case('cspresnet50', 'cspnet', _timm('cspresnet50', **RATES), (3, 64, 64),
         # cspnet.py BottleneckBlock: conv3 (conv -> BN) -> drop_path(x) + shortcut
         [Site(r'stages\.\d\.blocks\.\d+\.drop_path', 'DropPath', BRANCH, OK, 12), HEAD_DROPOUT]),
    Case('cspdarknet53', 'cspnet', _timm('cspdarknet53', **RATES), (3, 64, 64),
         [Site(r'stages\.\d\.blocks\.\d+\.drop_path', 'DropPath', BRANCH, OK, 22), HEAD_DROPOUT]),
    Case('skresnet18', 'sknet', _timm('skresnet18', drop_block_rate=0.1, **RATES), (3, 64, 64),
         # sknet.py SelectiveKernelBasic: conv1 = SelectiveKernel, its paths are ConvNormAct(drop_layer=DropBlock)
         # (BN -> drop -> act), stacked, attention-weighted, summed; then conv2 = ConvNormAct (conv -> BN).
         [Site(r'(layer[34]\.\d)\.conv1\.paths\.[01]\.bn\.drop', 'DropBlock2d', BRANCH, HAZARD, 8, '{0}.conv2.bn'),
          Site(r'layer\d\.\d\.drop_path', 'DropPath', BRANCH, OK, 7),
          Site(r'F\.dropout @ ResNet\.forward_head', 'F.dropout', HEAD_AFTER, OFF)]),
    Case('resnest26d', 'resnest', _timm('resnest26d', drop_block_rate=0.1, **RATES), (3, 64, 64),
         # resnest.py ResNestBottleneck (radix 2): conv2 = SplitAttn(drop_layer=DropBlock): bn0 -> drop -> act0, ...,
         # then conv3 -> bn3. Its forward applies drop_path to the block *input* x: `x = self.drop_path(x)`; x is
         # used again only as `shortcut = self.downsample(x)` (avg pool -> conv -> BN), so the DropPath of a
         # downsampling block feeds the shortcut's BN and that of any other block is dead code.
         [Site(r'(layer[34]\.\d)\.conv2\.drop', 'DropBlock2d', BRANCH, HAZARD, 4, '{0}.bn3'),
          Site(r'(layer[234]\.0)\.drop_path', 'DropPath', SHORTCUT, HAZARD, 3, '{0}.downsample.2'),
          Site(r'layer[1234]\.1\.drop_path', 'DropPath', UNUSED, OFF, 4),
          Site(r'F\.dropout @ ResNet\.forward_head', 'F.dropout', HEAD_AFTER, OFF)]),
    Case('dla34', 'dla', _timm('dla34', drop_rate=0.2), (3, 64, 64),
         [Site(r'head_drop', 'Dropout', HEAD_AFTER, OFF)]),                    # global_pool -> head_drop -> fc
    Case('dpn48b', 'dpn', _timm('dpn48b', drop_rate=0.2), (3, 64, 64),
         [Site(r'F\.dropout @ DPN\.forward_head', 'F.dropout', HEAD_AFTER, OFF)]),
    Case('rexnet_100', 'rexnet', _timm('rexnet_100', **RATES), (3, 64, 64), _rexnet_sites),
    Case('hrnet_w18_small', 'hrnet', _timm('hrnet_w18_small', drop_rate=0.2), (3, 64, 64),
         [Site(r'head_drop', 'Dropout', HEAD_AFTER, OFF)]),
    Case('ese_vovnet19b_dw', 'vovnet', _timm('ese_vovnet19b_dw', **RATES), (3, 64, 64), _vovnet_sites),
    Case('xception41', 'xception', _timm('xception41', **RATES), (3, 64, 64),
         # xception_aligned.py XceptionModule._residual: drop_path(x) + shortcut(skip), unless no_skip
         [Site(r'blocks\.\d+\.drop_path', 'DropPath', BRANCH, OK,
               lambda m: sum(isinstance(b.drop_path, DropPath) and not b.no_skip for b in m.blocks)), HEAD_DROPOUT]),
    Case('inception_v3@80px', 'inception', _timm('inception_v3', drop_rate=0.2), (3, 80, 80),
         # at 80 px Mixed_7c leaves a 1x1 map: global_pool -> head_drop on a single position
         [Site(r'head_drop', 'Dropout', HEAD_1X1, OK)]),
    Case('ghostnet_050', 'ghostnet', _timm('ghostnet_050', drop_rate=0.2), (3, 64, 64),
         [Site(r'F\.dropout @ GhostNet\.forward_head', 'F.dropout', HEAD_AFTER, OFF)]),
    Case('nf_regnet_b0', 'nfnet', _timm('nf_regnet_b0', **RATES), (3, 64, 64),
         # no BatchNorm at all (scaled weight standardisation): nothing can be a hazard
         [Site(r'stages\.\d\.\d+\.drop_path', 'DropPath', BRANCH, OK, _dp), HEAD_DROPOUT], has_bn=False),
]


# ----------------------------------------------------------------------------------------------------------
# hand-built models, one per rule
# ----------------------------------------------------------------------------------------------------------

class _Head(nn.Module):
    """stem conv -> body -> global average pool -> fc."""

    def __init__(self, body: nn.Module, chs: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, chs, 3, padding=1)
        self.body = body
        self.fc = nn.Linear(chs, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


class _Toy(nn.Module):
    """A model whose forward is a function of its submodules (the rule under test)."""

    def __init__(self, fn: Callable[[_Toy, torch.Tensor], torch.Tensor], **mods: nn.Module | nn.Parameter) -> None:
        super().__init__()
        self.fn = fn
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _conv(cin: int = 8, cout: int = 8, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class _NormWithDropout(nn.BatchNorm2d):
    """A norm module that runs a functional dropout inside its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), 0.1, self.training)


def _toy_bnact_drop() -> nn.Module:
    # the issue's toy: BatchNormAct2d(drop_layer=nn.Dropout) -> conv -> BN, no residual anywhere
    return _Toy(lambda s, x: s.fc(s.bn2(s.conv2(s.bn1(s.conv1(x)))).mean((2, 3))),
                conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=BatchNormAct2d(8, drop_layer=nn.Dropout),
                conv2=_conv(), bn2=nn.BatchNorm2d(8), fc=nn.Linear(8, 4))


def _toy_parallel(residual_after: bool) -> nn.Module:
    # dropout -> conv_a, + conv_b on the same input: two parallel branches, then a BN (+ optionally a real skip)
    def fwd(s: _Toy, x: torch.Tensor) -> torch.Tensor:
        h = s.bn(s.conv_a(s.drop(x)) + s.conv_b(x))
        return h + x if residual_after else h
    return _Head(_Toy(fwd, drop=nn.Dropout(0.1), conv_a=_conv(), conv_b=_conv(), bn=nn.BatchNorm2d(8)))


def _toy_pool_bn() -> nn.Module:
    # dropout -> global pool -> BatchNorm1d -> fc
    return _Toy(lambda s, x: s.fc(s.bn1d(F.adaptive_avg_pool2d(s.drop(s.act(s.bn(s.conv(x)))), 1).flatten(1))),
                conv=nn.Conv2d(3, 8, 1), bn=nn.BatchNorm2d(8), act=nn.ReLU(), drop=nn.Dropout(0.1),
                bn1d=nn.BatchNorm1d(8), fc=nn.Linear(8, 4))


def _toy_concat() -> nn.Module:
    # DenseNet-style: dropout -> concat with the input -> BN
    def fwd(s: _Toy, x: torch.Tensor) -> torch.Tensor:
        return s.conv2(torch.relu(s.bn(torch.cat([x, s.drop(s.conv1(x))], 1))))
    return _Head(_Toy(fwd, conv1=_conv(), drop=nn.Dropout(0.1), bn=nn.BatchNorm2d(16), conv2=_conv(16, 8)))


class _ShortcutDrop(nn.Module):
    """A residual block with a dropout in its skip path: identity skip, or a strided conv -> BN projection."""

    def __init__(self, project: bool) -> None:
        super().__init__()
        self.project = project
        stride = 2 if project else 1
        self.conv1, self.bn1 = _conv(8, 8, stride), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = _conv(), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)
        self.down_conv, self.down_bn = nn.Conv2d(8, 8, 1, stride=stride), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        skip = self.drop(x)
        if self.project:
            skip = self.down_bn(self.down_conv(skip))
        return torch.relu(h + skip)


class _Block(nn.Module):
    """A post-activation residual block with a dropout at a chosen spot, module or functional."""

    def __init__(self, where: str, kind: str = 'module') -> None:
        super().__init__()
        self.where, self.kind = where, kind
        self.conv1, self.bn1 = _conv(), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = _conv(), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)

    def _d(self, here: str, x: torch.Tensor) -> torch.Tensor:
        if here != self.where:
            return x
        if self.kind == 'functional':
            return F.dropout(x, 0.2, self.training)
        if self.kind == 'drop_path':                  # timm's functional stochastic depth: x * random mask
            return drop_path(x, 0.2, self.training)
        if self.kind == 'drop_block':                 # timm's functional DropBlock: x * mask * rescale
            return drop_block_2d(x, 0.2, 3)
        return self.drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(self._d('before_conv2', h)))
        h = self._d('after_bn2', h)
        if self.where == 'unused':
            self._d('unused', h)                      # result discarded
        return self._d('after_add', torch.relu(x + h))


def _blocks(where: str, kind: str = 'module') -> nn.Module:
    return _Head(nn.Sequential(_Block(where, kind), _Block('none')))


class _TinyAttention(nn.Module):
    """x + proj(sdpa(q, k, v, dropout_p)) on tokens, then a BatchNorm1d over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)                  # (B, N, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        t = t + self.proj(a)
        t = self.norm(t.transpose(1, 2)).transpose(1, 2)
        return self.fc(t.mean(1))


def _dropblock_block(module: Callable[..., nn.Module], **kw) -> nn.Module:
    # a timm block built with its drop_block knob, which the model classes (RegNet, CspNet) do not expose
    return _Head(module(32, 32, drop_block=partial(DropBlock2d, drop_prob=0.1, block_size=3), **kw), chs=32)


HAND_CASES: List[Case] = [
    Case('toy: BatchNormAct2d(drop_layer=nn.Dropout)', 'hand-built', _toy_bnact_drop, (3, 8, 8),
         [Site(r'bn1\.drop', 'Dropout', BODY, HAZARD, 1, 'bn2')]),
    Case('toy: dropout inside a BatchNorm subclass', 'hand-built',
         lambda: _Head(_Toy(lambda s, x: s.bn2(s.conv(s.norm(x))), norm=_NormWithDropout(8), conv=_conv(),
                            bn2=nn.BatchNorm2d(8))), (3, 8, 8),
         [Site(r'body\.norm: F\.dropout @ _NormWithDropout\.forward', 'F.dropout', BODY, HAZARD, 1, 'body.bn2')]),
    Case('toy: dropout -> conv, + parallel conv -> BN', 'hand-built', lambda: _toy_parallel(False), (3, 8, 8),
         [Site(r'body\.drop', 'Dropout', BODY, HAZARD, 1, 'body.bn')]),
    Case('toy: parallel sum -> BN, then + skip', 'hand-built', lambda: _toy_parallel(True), (3, 8, 8),
         [Site(r'body\.drop', 'Dropout', BRANCH, HAZARD, 1, 'body.bn')]),
    Case('toy: dropout -> pool -> BN (8x8 map)', 'hand-built', _toy_pool_bn, (3, 8, 8),
         # pooling 64 positions ends the walk (noise averaged down); the BN1d is named in the note
         [Site(r'drop', 'Dropout', HEAD_BEFORE, OK)]),
    Case('toy: dropout -> pool -> BN (1x1 map)', 'hand-built', _toy_pool_bn, (3, 1, 1),
         # pooling one position is the identity: the BN1d reads the dropped values
         [Site(r'drop', 'Dropout', HEAD_1X1, HAZARD, 1, 'bn1d')]),
    Case('toy: dropout -> concat -> BN', 'hand-built', _toy_concat, (3, 8, 8),
         [Site(r'body\.drop', 'Dropout', BODY, HAZARD, 1, 'body.bn')]),
    Case('toy: dropout in the identity shortcut', 'hand-built', lambda: _Head(_ShortcutDrop(False)), (3, 8, 8),
         [Site(r'body\.drop', 'Dropout', SHORTCUT, OFF)]),
    Case('toy: dropout in the projection shortcut', 'hand-built', lambda: _Head(_ShortcutDrop(True)), (3, 8, 8),
         [Site(r'body\.drop', 'Dropout', SHORTCUT, HAZARD, 1, 'body.down_bn')]),
    Case('toy: dropout after the merge', 'hand-built', lambda: _blocks('after_add'), (3, 8, 8),
         [Site(r'body\.0\.drop', 'Dropout', MAIN, HAZARD, 1, 'body.1.bn1')]),       # next block: conv1 -> bn1
    Case('toy: dropout before the last conv (post-act)', 'hand-built', lambda: _blocks('before_conv2'), (3, 8, 8),
         [Site(r'body\.0\.drop', 'Dropout', BRANCH, HAZARD, 1, 'body.0.bn2')]),
    Case('toy: dropout after the last BN', 'hand-built', lambda: _blocks('after_bn2'), (3, 8, 8),
         [Site(r'body\.0\.drop', 'Dropout', BRANCH, OK)]),
    Case('toy: functional F.dropout after the last BN', 'hand-built', lambda: _blocks('after_bn2', 'functional'),
         (3, 8, 8), [Site(r'body\.0: F\.dropout @ _Block\._d', 'F.dropout', BRANCH, OK)]),
    Case('toy: functional drop_path after the last BN', 'hand-built', lambda: _blocks('after_bn2', 'drop_path'),
         (3, 8, 8), [Site(r'body\.0: random mask \(\w+\) @ drop_path', 'random mask', BRANCH, OK, active=True)]),
    Case('toy: functional drop_block before the last conv', 'hand-built',
         lambda: _blocks('before_conv2', 'drop_block'), (3, 8, 8),
         [Site(r'body\.0: random mask \(\w+\) @ drop_block_2d', 'random mask', BRANCH, HAZARD, 1, 'body.0.bn2')]),
    Case('toy: dropout whose output is discarded', 'hand-built', lambda: _blocks('unused'), (3, 8, 8),
         [Site(r'body\.0\.drop', 'Dropout', UNUSED, OFF)]),
    Case('toy: dropout in the stem', 'hand-built',
         lambda: _Toy(lambda s, x: s.head(s.drop(x)), drop=nn.Dropout(0.1), head=_blocks('none')), (3, 8, 8),
         # dropout on the input: stem conv, then both operands of the first merge; the branch's conv1 -> bn1
         [Site(r'drop', 'Dropout', STEM, HAZARD, 1, 'head.body.0.bn1')]),
    Case('toy: dropout of a parameter added to the input', 'hand-built',
         lambda: _Toy(lambda s, x: s.net(x + s.drop(s.bias)), bias=nn.Parameter(torch.zeros(3, 1, 1)),
                      drop=nn.Dropout(0.1), net=_blocks('none')), (3, 8, 8),
         # like a dropped position embedding: an add with an untraced operand is no merge; the stem conv feeds
         # both operands of the first residual merge, and that block's conv1 -> bn1
         [Site(r'drop', 'Dropout', STEM, HAZARD, 1, 'net.body.0.bn1')]),
    Case('toy: dropout on the logits', 'hand-built',
         lambda: _Toy(lambda s, x: s.drop(s.net(x)), net=_blocks('none'), drop=nn.Dropout(0.1)), (3, 8, 8),
         [Site(r'drop', 'Dropout', HEAD_AFTER, OFF)]),                          # the head pool lies upstream
    Case('toy: dropout on a feature-map output', 'hand-built',
         lambda: _Toy(lambda s, x: s.drop(torch.relu(s.bn(s.conv(x)))), conv=nn.Conv2d(3, 8, 3), bn=nn.BatchNorm2d(8),
                      drop=nn.Dropout(0.1)), (3, 8, 8),
         [Site(r'drop', 'Dropout', HEAD, OFF)]),
    Case('toy: BN without running statistics', 'hand-built',
         lambda: _Head(_Toy(lambda s, x: s.bn(s.conv(s.drop(x))), drop=nn.Dropout(0.1), conv=_conv(),
                            bn=nn.BatchNorm2d(8, track_running_stats=False))), (3, 8, 8),
         [Site(r'body\.drop', 'Dropout', BODY, OFF)], has_bn=False),
    Case('toy: attention dropout in F.scaled_dot_product_attention', 'hand-built', _TinyAttention, (3, 16, 16),
         [Site(r'F\.scaled_dot_product_attention\(dropout_p\) @ _TinyAttention\.forward', 'F.sdpa dropout',
               BRANCH, OK)]),
    Case('timm regnet Bottleneck(drop_block=DropBlock2d)', 'regnet',
         lambda: _dropblock_block(regnet.Bottleneck, group_size=8, drop_path_rate=0.1), (3, 16, 16),
         # regnet.py: conv2 = ConvNormAct(drop_layer=drop_block) -> se -> conv3 (conv -> BN) -> drop_path + shortcut
         [Site(r'body\.conv2\.bn\.drop', 'DropBlock2d', BRANCH, HAZARD, 1, 'body.conv3.bn'),
          Site(r'body\.drop_path', 'DropPath', BRANCH, OK)]),
    Case('timm cspnet BottleneckBlock(drop_block=DropBlock2d)', 'cspnet',
         lambda: _dropblock_block(cspnet.BottleneckBlock, drop_path=0.1), (3, 16, 16),
         # cspnet.py: conv2 = ConvNormAct(drop_layer=drop_block) -> conv3 (conv -> BN) -> drop_path(x) + shortcut
         [Site(r'body\.conv2\.bn\.drop', 'DropBlock2d', BRANCH, HAZARD, 1, 'body.conv3.bn'),
          Site(r'body\.drop_path', 'DropPath', BRANCH, OK)]),
]

CASES = {c.id: c for c in TIMM_CASES + HAND_CASES}


@pytest.fixture(scope='module')
def corpus():
    """Builds and audits each case once (models are freed right after their check); shared by the tests below."""
    torch.set_num_threads(1)
    cache: Dict[str, Tuple[AuditReport, List[str]]] = {}

    def get(case_id: str) -> Tuple[AuditReport, List[str]]:
        if case_id not in cache:
            case = CASES[case_id]
            torch.manual_seed(0)
            model = case.build()
            report = audit(model, input_size=case.input_size)
            sites = case.sites(model) if callable(case.sites) else case.sites
            problems = check(report, sites, model)
            if report.has_bn != case.has_bn:
                problems.append(f'has_bn {report.has_bn}, want {case.has_bn}')
            cache[case_id] = report, problems
        return cache[case_id]
    return get


@pytest.mark.parametrize('case_id', list(CASES))
def test_corpus_case(corpus, case_id: str) -> None:
    report, problems = corpus(case_id)
    assert report.entries, f'{case_id}: no dropout-like op found'
    assert not problems, f'{case_id}:\n' + '\n'.join(problems)


def test_corpus_size() -> None:
    families = {c.family for c in TIMM_CASES}
    architectures = {c.id.split('@')[0] for c in TIMM_CASES}
    assert len(architectures) >= 25 and len(families) >= 20, (len(architectures), sorted(families))
    assert len(HAND_CASES) >= 15


def test_found_cases_of_issue_11(corpus) -> None:
    """What the audit missed before, one assertion each (the corpus checks every row; this names the finding)."""
    r, _ = corpus('resnet51q')                                     # DropBlock inside BatchNormAct2d was invisible
    assert sum(e.op == 'DropBlock2d' and e.verdict == HAZARD for e in r.entries) == 10 and r.hazards
    r, _ = corpus('skresnet18')                                    # was "0 dropout-like op(s)" with DropBlock on
    assert sum(e.op == 'DropBlock2d' for e in r.entries) == 8
    r, _ = corpus('toy: BatchNormAct2d(drop_layer=nn.Dropout)')
    assert [e.verdict for e in r.entries] == [HAZARD]
    r, _ = corpus('toy: dropout -> conv, + parallel conv -> BN')    # was "residual branch, ok"
    assert [(e.location, e.verdict) for e in r.entries] == [(BODY, HAZARD)]
    r, _ = corpus('densenet121')                                   # per-layer dropouts were "head, before pooling"
    assert HEAD_BEFORE not in {e.location for e in r.entries}
    r, _ = corpus('vit_tiny_patch16_224')                          # token pooling was not seen: head_drop was "head"
    assert r.entries[-1].name == 'head_drop' and r.entries[-1].location == HEAD_AFTER
    r, _ = corpus('toy: dropout -> pool -> BN (8x8 map)')
    assert 'bn1d reads it after a global pool over 64 positions' in r.entries[0].note


# ----------------------------------------------------------------------------------------------------------
# every *_dropres variant, both post-activation positions
# ----------------------------------------------------------------------------------------------------------

POSITIONS = ('after_last_bn', 'before_last_conv')
POST_ACT = (timm_resnet.BasicBlock, timm_resnet.Bottleneck)
PRE_ACT = (timm_resnetv2.PreActBasic, timm_resnetv2.PreActBottleneck)


def _reduced(name: str) -> Dict[str, object]:
    """Same blocks and depths, 32 channels per stage (the CIFAR networks are small already)."""
    if name.endswith('_cifar_dropres'):
        return {}
    if name.startswith('resnetv2_'):
        return dict(channels=(32, 32, 32, 32), stem_chs=8)
    return dict(channels=(32, 32, 32, 32), stem_width=8)


def _dropres_sites(model: nn.Module) -> List[Site]:
    # blocks.py: post-activation blocks place res_drop after the last BN (and SE), before x += shortcut, or, at
    # before_last_conv, after the BN + act that precede the last conv, so the last conv's BN reads it. Pre-
    # activation blocks: norm + act -> res_drop -> last conv -> + shortcut. heads.py: head_drop on the final
    # map, then global pooling.
    sites = [Site(r'head_drop', 'ResidualDropout', HEAD_BEFORE, OK)]
    for name, block in timm_dropres.residual_blocks(model):
        assert isinstance(block, POST_ACT + PRE_ACT), type(block)
        pattern = re.escape(f'{name}.res_drop')
        if isinstance(block, POST_ACT) and block.res_drop_pos == 'before_last_conv':
            last_bn = 'bn3' if isinstance(block, timm_resnet.Bottleneck) else 'bn2'
            sites.append(Site(pattern, 'ResidualDropout', BRANCH, HAZARD, 1, f'{name}.{last_bn}'))
        else:
            sites.append(Site(pattern, 'ResidualDropout', BRANCH, OK))
    return sites


# the ResNet family; the other families' twins (tests/models/test_families.py) have one position and other widths
RESNET_FAMILY = [n for n in timm_dropres.registered_models()
                 if n not in set(timm_dropres.models.dropres.family_variants())]


@pytest.mark.parametrize('name', RESNET_FAMILY)
def test_dropres_variant(name: str) -> None:
    """Both positions: one built by the registered entrypoint, the other by converting that model in place
    (``convert`` replaces the position; ``create_model(x_dropres)`` is ``convert(create_model(x))`` by
    construction). Which position comes from the entrypoint alternates along the registry, so both do."""
    torch.set_num_threads(1)
    index = RESNET_FAMILY.index(name)
    first, second = POSITIONS if index % 2 == 0 else POSITIONS[::-1]
    model = timm.create_model(name, res_drop_pos=first, res_drop_rate=0.1, drop_rate=0.1,
                              **_reduced(name))  # active dropout (the defaults are 0)
    rates = timm_dropres.dropout_args(model)
    for pos in (first, second):
        if pos == second:
            timm_dropres.convert(model, res_drop_rate=rates['res_drop_rate'], drop_rate=rates['drop_rate'],
                                 res_drop_pos=pos)
        # ImageNet variants at 64 px (2x2 final map); CIFAR ones at their own size (resolve_model_data_config)
        report = audit(model, input_size=None if name.endswith('_cifar_dropres') else (3, 64, 64))
        problems = check(report, _dropres_sites(model), model)
        assert not problems, f'{name} {pos}:\n' + '\n'.join(problems)
        pre_act = all(isinstance(b, PRE_ACT) for _, b in timm_dropres.residual_blocks(model))
        if pre_act or pos == 'after_last_bn':
            assert report.compliant                                # the README: "the *_dropres models are all ok"
