"""The transfer study harness: spec validation, paired few-shot subsets, a resumable smoke run."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from timm_dropres.research import transfer
from timm_dropres.research.transfer import Finetune, Pretrain, TransferArch, TransferSpec

pytestmark = pytest.mark.usefixtures('one_torch_thread')

ARCH = TransferArch('tiny', 'test_resnet_dropres', img_size=32)


def _spec(**kw) -> TransferSpec:
    base = dict(architectures=(ARCH,), configs=('none', 'default', 'head_after_pool'), seeds=(0, 1), shots=4,
                val_per_class=2, source_classes=(0, 1), target_classes=(2, 3),
                pretrain=Pretrain(epochs=1, batch_size=16), finetune=Finetune(epochs=1, batch_size=4))
    base.update(kw)
    return TransferSpec(**base)


def _data() -> transfer.TransferData:
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return transfer.TransferData(images(32), torch.arange(32) % 2, images(40), torch.arange(40) % 2, images(10),
                                 torch.arange(10) % 2, ['a', 'b'])


def test_spec_refuses_what_the_trainer_cannot_build_and_lists_every_error() -> None:
    with pytest.raises(ValueError) as e:
        _spec(configs=('none', 'after_add', 'everywhere'), source_classes=(0, 1), target_classes=(1, 2), shots=0)
    msg = str(e.value)
    assert "'after_add' is a hook-placed hazard" in msg and "unknown configuration 'everywhere'" in msg
    assert 'overlap: [1]' in msg and 'shots and val_per_class must be >= 1' in msg


def test_few_shot_subsets_are_disjoint_balanced_and_fixed_by_the_seed() -> None:
    spec, data = _spec(), _data()
    tr, va = transfer._few_shot(spec, data, seed=0)
    assert len(tr) == 8 and len(va) == 4 and not set(tr.tolist()) & set(va.tolist())
    assert torch.bincount(data.target_train_y[tr]).tolist() == [4, 4]
    assert torch.equal(transfer._few_shot(spec, data, 0)[0], tr)          # same seed, same subset
    assert not torch.equal(transfer._few_shot(spec, data, 1)[0], tr)      # another seed draws another one


def test_finetune_config_expresses_each_placement_with_public_flags(tmp_path: Path) -> None:
    spec = _spec()
    none = transfer.finetune_config(spec, ARCH, 'none', 0, tmp_path / 'w', tmp_path / 'o')
    guide = transfer.finetune_config(spec, ARCH, 'default@0.2', 0, tmp_path / 'w', tmp_path / 'o')
    after = transfer.finetune_config(spec, ARCH, 'head_after_pool', 0, tmp_path / 'w', tmp_path / 'o')
    assert (none.model, none.drop_rate, none.res_drop_rate) == ('test_resnet_dropres', 0.0, 0.0)
    assert (guide.drop_rate, guide.res_drop_rate, guide.res_drop_pos) == (0.2, 0.2, 'auto')
    assert (after.model, after.drop_rate, after.res_drop_rate) == ('test_resnet', 0.1, None)  # timm's own
    assert none.seed == guide.seed == 0 and none.pretrained_file == str(tmp_path / 'w')


def test_smoke_run_pretrains_once_fine_tunes_tests_and_resumes(tmp_path: Path, monkeypatch) -> None:
    spec, data = _spec(), _data()
    records, skipped = transfer.run_transfer(spec, tmp_path, data, log=lambda s: None)
    assert skipped == {'tiny': {}}
    assert [(r['config'], r['seed']) for r in records] == [(c, s) for s in (0, 1) for c in spec.configs]
    for r in records:
        assert 0.0 <= r['top1'] <= 100.0 and r['nll'] > 0 and r['test_images'] == 10 and r['train_images'] == 8
        assert r['steps'] == 2  # 8 images, batch 4, one epoch
    assert (tmp_path / 'pretrained' / 'tiny.safetensors').is_file()
    monkeypatch.setattr(transfer, 'run_one', lambda *a, **k: pytest.fail('a finished run was trained again'))
    monkeypatch.setattr(transfer, 'pretrain', lambda *a, **k: pytest.fail('pretrained twice'))
    again, _ = transfer.run_transfer(spec, tmp_path, data, log=lambda s: None)
    assert again == records
    changed = dataclasses.replace(spec, finetune=Finetune(epochs=2, batch_size=4))
    with pytest.raises(ValueError, match='different transfer specification'):
        transfer.run_transfer(changed, tmp_path, data, log=lambda s: None)


def test_committed_spec_loads() -> None:
    spec = transfer.load_transfer_spec(Path(__file__).resolve().parents[2] / 'configs' / 'study_transfer.yaml')
    assert len(spec.seeds) >= 5 and {'none', 'default', 'head_before_pool', 'head_after_pool'} <= set(spec.configs)
