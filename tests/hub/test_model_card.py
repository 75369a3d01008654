"""The model card: Hub metadata parsed back with huggingface_hub, and the body's facts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_helpers import ARCH, LABELS, make_summary
from huggingface_hub import ModelCard

import timm_dropres
from timm_dropres.errors import OptionError
from timm_dropres.hub.model_card import (
    PAPER_BIBTEX,
    base_model_id,
    build_card,
    dataset_id,
    eval_metrics,
    plain_timm_snippet,
    redact,
    scrub_paths,
    transformers_plain_snippet,
    transformers_snippet,
)

REPO = 'alice/test_resnet_dropres.fmnist'


@pytest.fixture(scope='module')
def model_and_config():
    with torch.device('meta'):  # the card needs the structure only, as push builds it
        import timm
        model = timm.create_model(ARCH, num_classes=4, in_chans=1, drop_rate=0.25, res_drop_rate=0.15,
                                  res_drop_pos='before_last_conv')
    config = {
        'architecture': ARCH, 'num_classes': 4, 'label_names': LABELS,
        'model_args': {'num_classes': 4, 'in_chans': 1, 'drop_rate': 0.25, 'res_drop_rate': 0.15,
                       'res_drop_pos': 'before_last_conv'},
        'pretrained_cfg': {'input_size': [1, 160, 160], 'mean': [0.5], 'std': [0.5], 'crop_pct': 0.95,
                           'interpolation': 'bilinear', 'license': 'apache-2.0', 'num_classes': 4},
    }
    return model, config


def _reparse(card: ModelCard) -> ModelCard:
    return ModelCard(str(card))


def test_metadata_round_trips_through_model_card(model_and_config):
    model, config = model_and_config
    summary = make_summary()
    card = _reparse(build_card(config, repo_id=REPO, model=model, summary=summary))
    d = card.data
    assert d.library_name == 'timm' and d.license == 'apache-2.0'
    assert d.tags == ['image-classification', 'timm', 'dropres']
    assert d.datasets == ['zalando-datasets/fashion_mnist'] and d.base_model == 'timm/test_resnet.r160_in1k'
    assert d.metrics == ['accuracy', 'top_5_accuracy']
    got = {(r.metric_type, r.metric_name): r.metric_value for r in d.eval_results}
    assert got == {('accuracy', 'top-1 accuracy'): summary['best']['top1'],
                   ('top_5_accuracy', 'top-5 accuracy'): summary['best']['top5']}
    # the trainer validates Fashion-MNIST on its official test split
    assert {(r.task_type, r.dataset_split) for r in d.eval_results} == {('image-classification', 'test')}


def test_last_checkpoint_reports_last_metrics(model_and_config):
    model, config = model_and_config
    summary = make_summary()
    card = _reparse(build_card(config, repo_id=REPO, model=model, summary=summary, checkpoint='last'))
    assert {r.metric_value for r in card.data.eval_results} == {summary['last']['top1'], summary['last']['top5']}
    assert '| last (these weights) | 3 | 86 | 99 | 0.4011 | 400 |' in card.text
    with pytest.raises(ValueError, match="'best' or 'last'|\"best\" or \"last\""):
        build_card(config, repo_id=REPO, model=model, summary=summary, checkpoint='ema')


def test_body_covers_placement_recipe_eval_usage_citation(model_and_config):
    model, config = model_and_config
    text = build_card(config, repo_id=REPO, model=model, summary=make_summary()).text
    assert timm_dropres.describe(model) in text  # placement table from the rebuilt network itself
    assert '| one per residual block (`res_drop_rate`) | 0.15 | `before_last_conv`' in text
    assert '| head (`drop_rate`) | 0.25 | `head_before_pool`' in text
    assert '| opt | adamw |' in text and '| lr | 0.001 |' in text and '| epochs | 3 |' in text
    assert '| best (these weights) | 2 | 87.5 | 99.25 | 0.3712 | 400 |' in text
    assert "timm.create_model('hf-hub:alice/test_resnet_dropres.fmnist', pretrained=True)" in text
    assert plain_timm_snippet(REPO, ARCH) in text and "# 'test_resnet': dropout has no weights" in text
    # transformers: with the plugin, and what to do without it (its own error says to upgrade timm)
    assert transformers_snippet(REPO) in text and transformers_plain_snippet(REPO, config) in text
    assert "architecture='test_resnet', model_args={'in_chans': 1}" in text  # no num_classes: transformers adds it
    assert 'Upgrading timm does not help: `pip install timm-dropres`' in text
    assert PAPER_BIBTEX in text
    assert '| train_size | 600 |' in text and '| train_img_per_s | 412.3 |' in text
    assert '/home/alice' not in text and '| output_dir |' not in text  # bookkeeping, not recipe
    assert '| 3 | 30 | 0.5 | 1e-06 | 86 | 99 | 0.4011 | 1.4 |' in text  # per-epoch history row


def test_without_summary_card_says_no_eval_results(model_and_config):
    model, config = model_and_config
    card = _reparse(build_card(config, repo_id=REPO, model=model, summary=None))
    assert card.data.eval_results is None and 'model-index' not in card.content
    assert card.data.base_model is None and card.data.datasets is None
    assert 'No evaluation results' in card.text and 'recipe is unknown' in card.text
    # explicit overrides fill what the summary would have said
    card = _reparse(build_card(config, repo_id=REPO, model=model, summary=None, license='mit',
                               base_model='timm/resnet18.a1_in1k', dataset='fashion_mnist'))
    assert (card.data.license, card.data.base_model, card.data.datasets) == \
        ('mit', 'timm/resnet18.a1_in1k', ['zalando-datasets/fashion_mnist'])


def test_without_summary_metrics_come_from_config(model_and_config):
    model, config = model_and_config
    config = dict(config, metrics=dict(top1=70.5, top5=95.0, loss=0.9, epoch=4), weights='ema',
                  dataset='/home/alice/data/pets')
    card = _reparse(build_card(config, repo_id=REPO, model=model, summary=None))
    assert {r.metric_value for r in card.data.eval_results} == {70.5, 95.0}
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results} == \
        {('imagefolder', 'pets', 'validation')}
    assert '| best (these weights) [EMA] | 4 | 70.5 | 95 | 0.9 |  |' in card.text
    assert '/home/alice' not in card.text


def test_eval_metrics_reads_the_trainer_summary():
    nested = {'best': {'top1': 91.0, 'top5': 99.5, 'loss': 0.2}, 'last': {'top1': 90.0}}
    assert eval_metrics(nested, 'best') == {'top1': 91.0, 'top5': 99.5, 'loss': 0.2}
    assert eval_metrics(nested, 'last') == {'top1': 90.0}
    assert eval_metrics({'best': {'top1': float('nan'), 'top5': True}}) == {}
    trainer = {'best': {'epoch': 2, 'top1': 91.0, 'weights': 'ema'}, 'last': {'top1': 90.0, 'num_samples': 7},
               'epochs_completed': 5}
    assert eval_metrics(trainer, 'best') == {'epoch': 2, 'top1': 91.0, 'weights': 'ema'}
    assert eval_metrics(trainer, 'last') == {'top1': 90.0, 'num_samples': 7, 'epoch': 5}


def test_base_model_and_dataset_resolution():
    assert base_model_id({'config': {'model': 'resnet50_dropres.a1_in1k', 'pretrained': True}}) == \
        'timm/resnet50.a1_in1k'
    assert base_model_id({'config': {'model': 'hf-hub:bob/net@v1', 'pretrained': True}}) == 'bob/net'
    assert base_model_id({'config': {'model': 'resnet50_dropres.a1_in1k', 'pretrained': False}}) is None
    assert base_model_id({'config': {'model': 'local-dir:/x/y', 'pretrained': True}}) is None
    assert base_model_id({'config': {'model': 'resnet50_dropres', 'pretrained': True, 'pretrained_file': 'w.pth'}}) \
        is None
    assert base_model_id(None) is None
    assert dataset_id('torch/cifar10') == ('uoft-cs/cifar10', 'torch/cifar10')
    assert dataset_id('hfds/bob/pets') == ('bob/pets', 'hfds/bob/pets')
    assert dataset_id('/data/alice/pets/') == (None, 'pets') and dataset_id('') == (None, None)


def test_redact_drops_secrets_and_local_paths():
    cfg = {'hub_token': 'x', 'HF_TOKEN': 'y', 'api_key': 'z', 'note': 'hf_' + 'a' * 34, 'lr': 0.1,
           'dataset': '/home/bob/data/pets', 'win': 'C:\\Users\\bob\\pets', 'mean': [0.5, 0.5, 0.5],
           'nested': {'a': 1}, 'obj': object(), 'none': None, 'output_dir': 'runs/x', 'model': 'local-dir:/a/b/best'}
    assert redact(cfg) == {'lr': 0.1, 'dataset': '.../pets', 'win': '.../pets', 'mean': '0.5, 0.5, 0.5',
                           'model': 'local-dir:.../best'}
    assert scrub_paths('F-MNIST (/usr/share/x/fashion-mnist), train') == 'F-MNIST (.../fashion-mnist), train'
    assert scrub_paths('torch/cifar10 hfds/bob/pets runs/x') == 'torch/cifar10 hfds/bob/pets runs/x'


def test_readme_cites_the_paper_as_the_cards_do():
    readme = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    assert PAPER_BIBTEX.strip() in readme  # one citation, the same in the README and every model card


def test_the_card_claims_only_the_data_the_run_recorded(model_and_config):
    """dropres-push --dataset cifar10 wrote a model-index with CIFAR-10's test split at a Fashion-MNIST run's
    accuracy."""
    model, config = model_and_config
    summary = make_summary()  # a Fashion-MNIST run
    with pytest.raises(OptionError, match="^dataset 'cifar10': the run's records say it trained and was evaluated "
                                          "on 'zalando-datasets/fashion_mnist'.*drop dataset$"):
        build_card(config, repo_id=REPO, model=model, summary=summary, dataset='cifar10')
    same = _reparse(build_card(config, repo_id=REPO, model=model, summary=summary, dataset='fmnist'))  # agrees
    assert {r.dataset_type for r in same.data.eval_results} == {'zalando-datasets/fashion_mnist'}
    with_metrics = dict(config, metrics=dict(top1=70.5, top5=95.0, loss=0.9, epoch=4))  # no dataset recorded
    card = _reparse(build_card(with_metrics, repo_id=REPO, model=model, summary=None, dataset='cifar10'))
    assert card.data.datasets == ['uoft-cs/cifar10'] and card.data.eval_results is None


def test_the_card_claims_only_the_starting_weights_the_run_recorded(model_and_config):
    model, config = model_and_config
    summary = make_summary()  # started from ARCH's pretrained weights
    recorded = build_card(config, repo_id=REPO, model=model, summary=summary).data.base_model
    with pytest.raises(OptionError, match=r"^base_model 'someone/else': the run's records say it started from"):
        build_card(config, repo_id=REPO, model=model, summary=summary, base_model='someone/else')
    scratch = dict(summary, config=dict(summary['config'], pretrained=False))
    with pytest.raises(OptionError, match="^base_model 'timm/resnet18.a1_in1k'.*trained from random initialisation"):
        build_card(config, repo_id=REPO, model=model, summary=scratch, base_model='timm/resnet18.a1_in1k')
    local = dict(summary, config=dict(summary['config'], pretrained_file='/w/start.safetensors'))
    card = build_card(config, repo_id=REPO, model=model, summary=local, base_model='timm/resnet18.a1_in1k')
    assert card.data.base_model == 'timm/resnet18.a1_in1k'  # a local file's Hub id: the records cannot name it
    assert recorded == 'timm/test_resnet.r160_in1k'  # naming the recorded one again is allowed
    assert build_card(config, repo_id=REPO, model=model, summary=summary, base_model=recorded).data.base_model == \
        recorded
