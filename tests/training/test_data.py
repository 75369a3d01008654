"""Dataset resolution, class/channel inference, subsets, and the resumable seeded sampling."""
from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
from helpers_train import CLASSES, make_image_folder

import timm_dropres  # noqa: F401
from timm_dropres.training import fmnist
from timm_dropres.training.data import (
    DataError,
    EpochSeededDataset,
    EpochSeededSampler,
    TensorImageDataset,
    resolve_data,
    resolve_transforms,
    subset,
)

HAS_FMNIST = fmnist.find_fashion_mnist() is not None


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _labels(ds) -> list:
    return [int(ds[i][1]) for i in range(len(ds))]


def test_image_folder_train_val(tmp_path):
    root = make_image_folder(tmp_path / 'ds', 4, 3)
    b = resolve_data(str(root))
    assert b.label_names == sorted(CLASSES)
    assert (len(b.train), len(b.val), b.in_chans) == (12, 9, 3)
    img, target = b.train[0]
    assert img.mode == 'RGB' and target == 0
    assert Counter(_labels(b.val)) == {0: 3, 1: 3, 2: 3}


def test_image_folder_without_val_holds_out_a_stratified_fraction(tmp_path):
    root = make_image_folder(tmp_path / 'ds', 10, with_val=False)
    b = resolve_data(str(root), val_fraction=0.2, seed=3)
    assert (len(b.train), len(b.val)) == (24, 6)
    assert Counter(_labels(b.val)) == {0: 2, 1: 2, 2: 2}
    train_files = {b.train.base.filename(i) for i in b.train.indices}
    val_files = {b.val.base.filename(i) for i in b.val.indices}
    assert not train_files & val_files and len(train_files | val_files) == 30
    again = resolve_data(str(root), val_fraction=0.2, seed=3)
    assert again.val.indices == b.val.indices  # seeded: the same hold-out every time


def test_grayscale_folder_gives_one_channel_and_transforms(tmp_path):
    root = make_image_folder(tmp_path / 'ds', 3, 2, gray=True)
    b = resolve_data(str(root))
    assert b.in_chans == 1 and b.train[0][0].mode == 'L'
    model = timm.create_model('test_resnet_dropres', num_classes=3, in_chans=1)
    train_tf, eval_tf, cfg = resolve_transforms(model, 1, img_size=24)
    assert cfg['input_size'] == (1, 24, 24) and len(cfg['mean']) == 1
    assert train_tf(b.train[0][0]).shape == eval_tf(b.val[0][0]).shape == (1, 24, 24)


def test_subset_is_class_balanced_and_seeded(tmp_path):
    root = make_image_folder(tmp_path / 'ds', 8, 2)
    b = resolve_data(str(root), train_subset=6, seed=1)
    assert len(b.train) == 6 and Counter(_labels(b.train)) == {0: 2, 1: 2, 2: 2}
    assert resolve_data(str(root), train_subset=6, seed=1).train.indices == b.train.indices
    with pytest.raises(DataError, match='positive'):
        subset(b.val, 0, 0, 'val-subset')


def test_epoch_seeded_dataset_is_deterministic_and_leaves_global_rng_alone():
    images = torch.randint(0, 255, (4, 16, 16), dtype=torch.uint8)
    base = TensorImageDataset(images, [0, 1, 0, 1])
    model = timm.create_model('test_resnet_dropres', num_classes=2, in_chans=1)
    train_tf, _, _ = resolve_transforms(model, 1, img_size=16, auto_augment='rand-m9-mstd0.5', re_prob=0.5)
    ds = EpochSeededDataset(base, train_tf, seed=7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[2][0]
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream is not consumed by augmentation
    assert torch.equal(a, ds[2][0])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[2][0])


def test_epoch_seeded_sampler():
    s = EpochSeededSampler(10, seed=5)
    first = list(s)
    assert sorted(first) == list(range(10)) and first == list(s)
    s.set_epoch(1)
    assert list(s) != first


def test_missing_path_and_empty_class_folder(tmp_path):
    with pytest.raises(DataError, match='does not exist.*torch/'):
        resolve_data(str(tmp_path / 'nope'))
    root = make_image_folder(tmp_path / 'ds', 2, 1)
    (root / 'train' / 'empty_class').mkdir()
    with pytest.raises(DataError, match='empty_class has no images'):
        resolve_data(str(root))


def test_val_class_missing_from_train(tmp_path):
    root = make_image_folder(tmp_path / 'ds', 2, 1)
    make_image_folder(tmp_path / 'extra', 1, 1, classes=('zebra',))
    (tmp_path / 'extra' / 'val' / 'zebra').rename(root / 'val' / 'zebra')
    with pytest.raises(DataError, match="zebra"):
        resolve_data(str(root))


def test_class_names_force_the_model_label_order(tmp_path):
    root = make_image_folder(tmp_path / 'ds', 1, 2)
    order = ['stripes', 'circle', 'square', 'unused']
    b = resolve_data(str(root), split='val', class_names=order)
    assert b.label_names == order and b.train is None
    names = {b.val.filename(i, basename=True).split('_')[0]: int(b.val[i][1]) for i in range(len(b.val))}
    assert names == {'stripes': 0, 'circle': 1, 'square': 2}
    with pytest.raises(DataError, match='does not know'):
        resolve_data(str(root), split='val', class_names=['circle', 'square'])


def test_timm_dataset_name_without_download_says_how(tmp_path):
    with pytest.raises(DataError, match='Add download to fetch it'):  # the option's field name (CLI: --download)
        resolve_data('torch/cifar10', data_dir=str(tmp_path))


@pytest.mark.fmnist
@pytest.mark.skipif(not HAS_FMNIST, reason='Debian dataset-fashion-mnist is not installed '
                                           '(apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_from_debian_without_flags():
    b = resolve_data('fashion_mnist', train_subset=100, val_subset=50, seed=0)
    assert b.label_names == fmnist.CLASSES and b.in_chans == 1
    assert Counter(_labels(b.train)) == {c: 10 for c in range(10)}
    assert len(b.val) == 50 and b.train[0][0].size == (28, 28)
    rev = resolve_data('fashion_mnist', val_subset=20, class_names=list(reversed(fmnist.CLASSES)), split='val')
    plain = resolve_data('fashion_mnist', val_subset=20, split='val')
    assert [9 - t for t in _labels(plain.val)] == _labels(rev.val)


class _StartingLoader:
    """A loader whose start swallows a Ctrl-C, as Python does inside an at-fork callback ("Exception ignored")."""
    num_workers = 1

    def __iter__(self):
        import signal
        try:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the workers start...
        except KeyboardInterrupt:
            pass  # ...lost, unless it was held back
        yield 1
        yield 2


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test. A background job (``cmd &`` in a script, as ``nohup make test &``)
    starts with SIGINT ignored and Python keeps it ignored, so no Ctrl-C would raise and the test would fail."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_iterate_delivers_a_ctrl_c_pressed_while_the_workers_start(ctrl_c_raises):
    from timm_dropres.training.data import iterate
    assert list(_StartingLoader()) == [1, 2]  # plain iteration: the Ctrl-C is gone
    with pytest.raises(KeyboardInterrupt):
        list(iterate(_StartingLoader()))
    assert list(iterate([3, 4])) == [3, 4] and list(iterate(torch.utils.data.DataLoader(range(3)))) == [
        torch.tensor([0]), torch.tensor([1]), torch.tensor([2])]
