"""The published-tags registry: shipped data is valid and registered; the merge rules hold.

The end-to-end path (an env-var registry, ``timm.list_pretrained`` and ``create_model(<tag>,
pretrained=True)`` from an offline HF cache) runs in ``test_hub.py::test_published_tag_resolves_to_its_hub_id``.
"""
from __future__ import annotations

import json
from collections import deque

import pytest
import timm
from hub_helpers import ARCH, LABELS
from timm.models._pretrained import DefaultCfg, PretrainedCfg

import timm_dropres
from timm_dropres.models.dropres import _mirror_cfgs
from timm_dropres.models.published import (
    ENV_VAR,
    REGISTRY_PATH,
    load_published,
    published_tags,
    registry_entry,
    with_published_tags,
)

ENTRY = {'hf_hub_id': 'alice/test_resnet_dropres.fmnist', 'num_classes': 4, 'input_size': [1, 28, 28],
         'mean': [0.286], 'std': [0.353], 'label_names': LABELS}


@pytest.fixture(autouse=True)
def _no_env_registry(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _write(tmp_path, data, name='p.json'):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_shipped_registry_is_valid_and_every_tag_is_registered():
    data = json.loads(REGISTRY_PATH.read_text())  # plain JSON, no comments: data, not code
    assert isinstance(data, dict)
    registry = load_published(known=timm_dropres.registered_models())
    assert registry == data
    for name, hub_id in published_tags().items():
        assert name in timm.list_pretrained(name.split('.')[0] + '*')
        assert timm.models.get_pretrained_cfg(name).hf_hub_id == hub_id
        assert timm.models.get_pretrained_cfg(name.split('.')[0]).hf_hub_id != hub_id or \
            data[name.split('.')[0]][name.split('.')[1]].get('default') is True


def test_published_tag_is_appended_after_base_tags():
    base = _mirror_cfgs('test_resnet')
    merged = with_published_tags(ARCH, base, {ARCH: {'fmnist_ft': ENTRY}})
    assert list(merged.tags) == list(base.tags) + ['fmnist_ft']
    assert merged.tags[0] == base.tags[0]  # the default tag is unchanged
    cfg = merged.cfgs['fmnist_ft']
    assert isinstance(cfg, PretrainedCfg) and cfg.hf_hub_id == ENTRY['hf_hub_id']
    assert cfg.hf_hub_filename == 'model.safetensors' and cfg.input_size == (1, 28, 28) and cfg.mean == (0.286,)
    assert cfg.num_classes == 4 and cfg.label_names == LABELS
    assert with_published_tags(ARCH, base, {}) is base  # nothing published: untouched


def test_default_only_when_marked():
    base = _mirror_cfgs('test_resnet')
    merged = with_published_tags(ARCH, base, {ARCH: {'fmnist_ft': dict(ENTRY, default=True)}})
    assert merged.tags[0] == 'fmnist_ft' and list(merged.tags)[1:] == list(base.tags)
    # a model without base tags keeps a weightless untagged default unless the entry is marked
    merged = with_published_tags(ARCH, None, {ARCH: {'fmnist_ft': ENTRY}})
    assert list(merged.tags) == ['', 'fmnist_ft'] and not merged.cfgs[''].has_weights


def test_published_tag_may_not_shadow_a_base_tag():
    base = _mirror_cfgs('test_resnet')
    with pytest.raises(ValueError, match='name of a base pretrained tag'):
        with_published_tags(ARCH, base, {ARCH: {base.tags[0]: ENTRY}})


@pytest.mark.parametrize('data, msg', [
    ({'resnet50': {'x': ENTRY}}, 'not a dropres model name'),
    ({'resnet50_gn_dropres': {'x': ENTRY}}, 'not a dropres model name'),  # skipped GroupNorm arch: not registered
    ({ARCH: {'x': {'num_classes': 4}}}, 'needs "hf_hub_id"'),
    ({ARCH: {'x': dict(ENTRY, hf_hub_id='no-namespace')}}, 'needs "hf_hub_id"'),
    ({ARCH: {'x': dict(ENTRY, weights='y')}}, r"unknown keys \['weights'\]; valid keys: .*hf_hub_id"),
    ({ARCH: {'x': dict(ENTRY, architecture='y')}}, r"unknown keys \['architecture'\]"),
    ({ARCH: {'x': dict(ENTRY, default='yes')}}, 'must be true or false'),
    ({ARCH: {'x': dict(ENTRY, input_size=[28, 28])}}, r'\[channels, height, width\]'),
    ({ARCH: {'a.b': ENTRY}}, 'contain no "."'),
    ({ARCH: {}}, 'must map tag names'),
    ([], 'must hold a JSON object'),
])
def test_bad_registry_is_a_clear_error(tmp_path, data, msg):
    with pytest.raises(ValueError, match=msg):
        load_published(_write(tmp_path, data), known=timm_dropres.registered_models())


def test_bad_registry_file(tmp_path):
    (tmp_path / 'bad.json').write_text('{"a": ')
    with pytest.raises(ValueError, match='not valid JSON'):
        load_published(tmp_path / 'bad.json')
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        load_published(tmp_path / 'missing.json')


def test_env_var_registry_is_merged_on_top(tmp_path, monkeypatch, caplog):
    shipped = _write(tmp_path, {ARCH: {'a': ENTRY, 'b': ENTRY}}, 'shipped.json')
    extra = _write(tmp_path, {ARCH: {'b': dict(ENTRY, hf_hub_id='bob/other')},
                              'resnet18_dropres': {'c': ENTRY}}, 'extra.json')
    monkeypatch.setenv(ENV_VAR, str(extra))
    reg = load_published(shipped)
    assert reg[ARCH]['a']['hf_hub_id'] == ENTRY['hf_hub_id'] and reg[ARCH]['b']['hf_hub_id'] == 'bob/other'
    assert set(reg) == {ARCH, 'resnet18_dropres'}
    assert 'overrides the shipped published tag test_resnet_dropres.b' in caplog.text
    assert published_tags(shipped) == {f'{ARCH}.a': ENTRY['hf_hub_id'], f'{ARCH}.b': 'bob/other',
                                       'resnet18_dropres.c': ENTRY['hf_hub_id']}


def test_registry_entry_from_a_folder_config_builds_the_published_model():
    config = {'architecture': ARCH, 'num_classes': 4, 'label_names': LABELS,
              'model_args': {'in_chans': 1, 'num_classes': 4},
              'pretrained_cfg': {'tag': 'r160_in1k', 'input_size': [1, 28, 28], 'mean': [0.5], 'std': [0.5],
                                 'crop_pct': 0.95, 'num_classes': 4, 'license': 'apache-2.0'}}
    entry = registry_entry(config, 'alice/x')
    assert entry['hf_hub_id'] == 'alice/x' and 'tag' not in entry and 'default' not in entry
    assert entry['label_names'] == LABELS and entry['input_size'] == [1, 28, 28]
    merged = with_published_tags(ARCH, _mirror_cfgs('test_resnet'), {ARCH: {'ft': json.loads(json.dumps(entry))}})
    assert isinstance(merged, DefaultCfg) and merged.cfgs['ft'].hf_hub_id == 'alice/x'
    assert registry_entry(config, 'alice/x', default=True)['default'] is True
    # the entry sets in_chans/num_classes defaults the way timm reads them from a pretrained cfg
    from timm.models._builder import _update_default_model_kwargs
    kwargs: dict = {}
    _update_default_model_kwargs(merged.cfgs['ft'].to_dict(), kwargs, None)
    assert kwargs['in_chans'] == 1 and kwargs['num_classes'] == 4
    assert deque(merged.tags)[-1] == 'ft'
