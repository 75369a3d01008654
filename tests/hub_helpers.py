"""Builders shared by the Hub tests: a fine-tuned run folder, its summary.json, and an HF cache layout."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import timm
import torch
import torch.nn as nn

from timm_dropres.models.hf_folder import save_pretrained_folder

ARCH = 'test_resnet_dropres'
LABELS = ['t-shirt', 'trouser', 'pullover', 'dress']
IMG = 32


def make_model(in_chans: int = 1) -> nn.Module:
    """A small dropres model with non-trivial weights and BN running statistics (as after fine-tuning)."""
    torch.manual_seed(1)
    model = timm.create_model(ARCH, num_classes=len(LABELS), in_chans=in_chans, drop_rate=0.25, res_drop_rate=0.15)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, in_chans, IMG, IMG))
    return model.eval()


def make_summary(**overrides: Any) -> Dict[str, Any]:
    """A summary.json in the schema of ``timm_dropres.training.trainer`` (``_Trainer._summary``), values made up."""
    history = [
        dict(epoch=1, step=10, train_loss=0.9, lr=1e-3, top1=80.0, top5=98.0, loss=0.55, eval_time_s=1.5),
        dict(epoch=2, step=20, train_loss=0.6, lr=5e-4, top1=87.5, top5=99.25, loss=0.3712, eval_time_s=1.4),
        dict(epoch=3, step=30, train_loss=0.5, lr=1e-6, top1=86.0, top5=99.0, loss=0.4011, eval_time_s=1.4),
    ]
    config = dict(model=ARCH, pretrained=True, pretrained_file=None, drop_rate=0.25, res_drop_rate=0.15,
                  res_drop_pos=None, dataset='fashion_mnist', data_dir=None, img_size=IMG, opt='adamw', lr=1e-3,
                  weight_decay=0.05, sched='cosine', epochs=3, warmup_epochs=1, batch_size=64, smoothing=0.1,
                  mixed_precision='no', seed=42, output_dir='/home/alice/private/runs/x', resume=None, cpu=True)
    summary = dict(
        model=ARCH, dataset='fashion_mnist', data='Fashion-MNIST (/usr/share/datasets/fashion-mnist), train + test',
        num_classes=len(LABELS), label_names=LABELS, in_chans=1, input_size=[1, IMG, IMG], train_size=600,
        val_size=400, epochs_completed=3, global_steps=30, interrupted=False,
        best=dict(epoch=2, top1=87.5, top5=99.25, loss=0.3712, weights='model'),
        last=dict(top1=86.0, top5=99.0, loss=0.4011, num_samples=400, per_class_accuracy={}, per_class_count={}),
        last_ema=None, history=history,
        throughput=dict(train_img_per_s=412.3, train_images=1800, train_time_s=4.4), wall_time_s=65.2,
        num_processes=1, device='cpu', distributed_type='DistributedType.NO', mixed_precision='no',
        model_kwargs=dict(drop_rate=0.25, res_drop_rate=0.15, num_classes=len(LABELS), in_chans=1),
        dropout_args=dict(drop_rate=0.25, res_drop_rate=0.15, res_drop_pos='after_last_bn'),
        output_dir='/home/alice/private/runs/x', config=config,
        versions=dict(timm_dropres='0.1.0', timm=timm.__version__, torch=torch.__version__),
    )
    summary.update(overrides)
    return summary


def make_run(root: Path, model: nn.Module, summary: Dict[str, Any] | None = None, name: str = 'best') -> Path:
    """``root/run/<name>/`` as the trainer writes it, with ``root/run/summary.json`` beside it."""
    extra, data_config, license = None, None, None
    if summary is not None:  # what the trainer adds to config.json (trainer.py, _Trainer.export)
        extra = dict(metrics={k: summary['best'][k] for k in ('top1', 'top5', 'loss', 'epoch')}, weights='model',
                     finetuned_from=summary['model'], dataset=summary['data'])
        data_config = dict(input_size=(model.conv1[0].in_channels, IMG, IMG), interpolation='bilinear',
                           mean=(0.5,) * model.conv1[0].in_channels, std=(0.5,) * model.conv1[0].in_channels,
                           crop_pct=1.0, crop_mode='center')
        license = 'apache-2.0'  # the license of the pretrained weights the summary's run started from
    folder = save_pretrained_folder(model, root / 'run' / name, label_names=LABELS, data_config=data_config,
                                    license=license, extra_config=extra)
    if summary is not None:
        (root / 'run' / 'summary.json').write_text(json.dumps(summary))
    return folder


def build_hf_cache(cache: Path, repo_id: str, files: Iterable[Path], commit: str = 'a' * 40) -> Path:
    """The layout ``huggingface_hub`` downloads into: blobs by hash, snapshot symlinks, refs/main -> commit."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    snap = repo / 'snapshots' / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = Path(f).read_bytes()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / Path(f).name)
    (repo / 'refs' / 'main').write_text(commit)
    return repo


def code_blocks(markdown: str, lang: str = 'python') -> List[str]:
    """The fenced ``lang`` code blocks of a Markdown text, in order."""
    blocks, cur = [], None
    for line in markdown.splitlines():
        if cur is None and line.strip() == f'```{lang}':
            cur = []
        elif cur is not None and line.strip() == '```':
            blocks.append('\n'.join(cur))
            cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def sites(model: nn.Module) -> List[Tuple[str, str, float]]:
    from timm_dropres import dropout_sites
    return [(s.name, s.where, s.p) for s in dropout_sites(model)]


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records each call and what the uploaded folder held."""

    def __init__(self, has_card: bool = False) -> None:
        self.has_card = has_card
        self.calls: List[Tuple[str, Dict[str, Any]]] = []
        self.uploaded: Dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kw: Any) -> Any:
        self.calls.append(('create_repo', dict(repo_id=repo_id, **kw)))
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def create_branch(self, repo_id: str, **kw: Any) -> None:
        self.calls.append(('create_branch', dict(repo_id=repo_id, **kw)))

    def file_exists(self, repo_id: str, filename: str, **kw: Any) -> bool:
        self.calls.append(('file_exists', dict(repo_id=repo_id, filename=filename, **kw)))
        return self.has_card and filename == 'README.md'

    def upload_folder(self, **kw: Any) -> Any:
        self.calls.append(('upload_folder', dict(kw)))
        self.uploaded = {p.name: p.read_bytes() for p in Path(kw['folder_path']).iterdir()}
        url = f'https://huggingface.co/{kw["repo_id"]}/commit/{"b" * 40}'
        return type('CommitInfo', (), {'commit_url': url, 'pr_url': None})()

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self.calls]
