"""Datasets and loaders: the embedded digits, tiny image folders made here, and every error a user can hit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import write_image_folder
from torch.utils.data import DataLoader, Subset

from spvit_search.data import (
    DataConfig,
    DigitsDataset,
    build_dataset,
    build_datasets,
    build_loader,
    build_loaders,
    default_num_workers,
    holdout_split,
    load_digits,
    num_classes_of,
)


def _targets(loader) -> list[int]:
    return [int(t) for _, y in loader for t in y]


# --- digits -------------------------------------------------------------------------------------------------------


def test_digits_are_scikit_learns():
    from sklearn.datasets import load_digits as sklearn_digits

    pixels, labels = load_digits()
    truth = sklearn_digits()
    assert np.array_equal(pixels, truth.data) and np.array_equal(labels, truth.target)
    image, _ = build_dataset("digits", "val", 8)[0]  # at 8 px no resampling: the file's pixels, normalised
    raw = image[0] * 0.229 + 0.485
    first_val = build_dataset("digits", "val", 8).indices[0]
    torch.testing.assert_close(raw, torch.from_numpy(truth.images[first_val]).float() / 16, atol=1e-6, rtol=0)


def test_digits_split_sizes_disjoint_and_stratified():
    train, val = build_dataset("digits", "train", 32), build_dataset("digits", "val", 32)
    assert len(train) + len(val) == 1797
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(1797))
    assert num_classes_of(train) == num_classes_of(val) == 10
    counts = np.bincount(val.targets.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20 % of each class's ~180 images


def test_digits_split_ignores_global_rng():
    targets = list(np.repeat(np.arange(10), 18))
    np.random.seed(1)
    torch.manual_seed(1)
    first = holdout_split(targets, 0.2, seed=0)
    np.random.seed(2)
    torch.manual_seed(2)
    assert holdout_split(targets, 0.2, seed=0) == first
    assert holdout_split(targets, 0.2, seed=1) != first
    assert DigitsDataset("val", 16).indices == build_dataset("digits", "val", 16).indices


@pytest.mark.parametrize("img_size", [32, 16])
def test_digits_shapes_and_normalisation(img_size):
    image, target = build_dataset("digits", "val", img_size)[0]
    assert image.shape == (3, img_size, img_size) and image.dtype == torch.float32
    assert isinstance(target, int) and 0 <= target < 10
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    background = image[:, 0, 0] * std + mean  # the corner of a digit is blank paper: 0 before normalisation
    torch.testing.assert_close(background, torch.zeros(3), atol=1e-6, rtol=0)
    raw = image * std.view(3, 1, 1) + mean.view(3, 1, 1)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    torch.testing.assert_close(raw[0], raw[2])  # gray repeated to 3 channels


def test_digits_augmentation_only_on_train():
    torch.manual_seed(0)
    plain = build_dataset("digits", "train", 32, augment=False)
    shifted = build_dataset("digits", "train", 32, augment=True)
    val = build_dataset("digits", "val", 32, augment=True)
    assert any(not torch.equal(plain[i][0], shifted[i][0]) for i in range(8))
    assert torch.equal(val[0][0], val[0][0])
    assert torch.equal(plain[0][0], plain[0][0])


# --- loaders ------------------------------------------------------------------------------------------------------


def test_loader_batches():
    dataset = build_dataset("digits", "val", 16)
    batches = list(build_loader(dataset, batch_size=64, train=False))
    assert [len(y) for _, y in batches] == [64] * 5 + [39]
    assert batches[0][0].shape == (64, 3, 16, 16) and batches[0][1].dtype == torch.int64
    assert _targets(build_loader(dataset, 64, train=False)) == dataset.targets.tolist()  # val is not shuffled


def test_loader_shuffling_is_seeded_per_epoch():
    dataset = build_dataset("digits", "train", 16, augment=False)
    a, b, other = (build_loader(dataset, 256, train=True, seed=s) for s in (0, 0, 1))
    assert _targets(a) == _targets(b)
    assert _targets(a) != _targets(other)
    assert next(iter(a))[0].equal(next(iter(b))[0])
    epoch0 = _targets(a)
    assert _targets(a) == epoch0  # no set_epoch: the same order again
    a.sampler.set_epoch(1)
    b.sampler.set_epoch(1)
    assert _targets(a) == _targets(b) != epoch0
    assert sorted(_targets(a)) == sorted(dataset.targets.tolist())


def test_distributed_loader_needs_a_process_group_and_matches_one_process(tmp_path):
    dataset = build_dataset("digits", "val", 8)
    with pytest.raises(ValueError, match="init_process_group"):
        build_loader(dataset, 32, train=True, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = build_loader(dataset, 32, train=True, seed=3, distributed=True)
        assert _targets(ddp) == _targets(build_loader(dataset, 32, train=True, seed=3))
    finally:
        dist.destroy_process_group()


def test_build_loaders_from_config():
    config = DataConfig(batch_size=100)
    train, val = build_loaders(config, *build_datasets(config, img_size=16), seed=0)
    images, targets = next(iter(train))
    assert images.shape == (100, 3, 16, 16) and len(targets) == 100
    assert len(train.dataset) + len(val.dataset) == 1797


def test_default_num_workers(monkeypatch):
    assert default_num_workers("digits") == 0  # in memory already: workers would only add start-up time
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(3)), raising=False)
    assert default_num_workers("torch/cifar10") == default_num_workers("/data/imagenet") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers("/data/imagenet") == 8


def test_loader_workers_persist_prefetch_and_pin_on_request():
    dataset = build_dataset("digits", "val", 8)
    in_process = build_loader(dataset, 32, train=False)
    assert (in_process.num_workers, in_process.persistent_workers, in_process.pin_memory) == (0, False, False)
    workers = build_loader(dataset, 32, train=False, num_workers=2, pin_memory=True)
    assert workers.persistent_workers and workers.prefetch_factor == 4 and workers.pin_memory


def _epoch(loader: DataLoader, epoch: int, seed: int) -> list[torch.Tensor]:
    """One epoch's images, laid out as the Engine lays an epoch out (set_epoch, then the generator at seed + epoch)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed + epoch)
    return [images for images, _ in loader]


def test_persistent_worker_augmentation_depends_only_on_seed_and_epoch(image_folder):
    """Workers persist across epochs; epoch e must still look the same to a run resumed at e, from its start or from
    the middle (the Engine's mid-epoch loader over the rest of the sampler's keys), as to an uninterrupted run."""
    dataset = build_dataset(image_folder, "train", 16)  # timm's train transform: random crop, flip, colour jitter
    seed, last, batch = 3, 2, 4
    uninterrupted = build_loader(dataset, batch, train=True, num_workers=2, seed=seed)
    epochs = [_epoch(uninterrupted, e, seed) for e in range(last + 1)]
    resumed = _epoch(build_loader(dataset, batch, train=True, num_workers=2, seed=seed), last, seed)
    assert len(resumed) == len(epochs[last]) == 8
    assert all(torch.equal(a, b) for a, b in zip(resumed, epochs[last], strict=True))

    fresh = build_loader(dataset, batch, train=True, num_workers=2, seed=seed)
    fresh.sampler.set_epoch(last)
    rest = DataLoader(fresh.dataset, batch_size=batch, sampler=list(fresh.sampler)[3 * batch :], num_workers=2,
                      collate_fn=fresh.collate_fn, generator=fresh.generator)  # fmt: skip
    assert all(torch.equal(a, b) for (a, _), b in zip(rest, epochs[last][3:], strict=True))

    plain = build_dataset(image_folder, "train", 16, augment=False)
    unaugmented = _epoch(build_loader(plain, batch, train=True, num_workers=2, seed=seed), last, seed)
    assert not any(torch.equal(a, b) for a, b in zip(unaugmented, epochs[last], strict=True))  # augmentation is on
    assert not torch.equal(torch.cat(epochs[0]).sum(0), torch.cat(epochs[1]).sum(0))  # and redrawn every epoch


# --- folders ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_image_folder_round_trip(tmp_path, val_name):
    write_image_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    write_image_folder(tmp_path / val_name, {"dog": 2})  # a val split without every class keeps train's indices
    train = build_dataset(str(tmp_path), "train", 16)
    val = build_dataset(tmp_path, "val", 16)
    assert (len(train), len(val)) == (6, 2)
    assert num_classes_of(train) == num_classes_of(val) == 2
    image, target = val[0]
    assert image.shape == (3, 16, 16) and target == 1
    images, targets = next(iter(build_loader(train, batch_size=4, train=True)))
    assert images.shape == (4, 3, 16, 16) and set(targets.tolist()) <= {0, 1}
    assert sorted(_targets(build_loader(train, 4, train=True))) == [0, 0, 0, 1, 1, 1]


def test_single_image_folder_is_split_per_class(tmp_path):
    write_image_folder(tmp_path, {"a": 5, "b": 10})
    train, val = build_dataset(tmp_path, "train", 16), build_dataset(tmp_path, "val", 16)
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert (len(train), len(val)) == (12, 3)
    assert set(train.indices).isdisjoint(val.indices)
    assert build_dataset(tmp_path, "val", 16).indices == val.indices
    assert sorted(val[i][1] for i in range(len(val))) == [0, 1, 1]
    assert num_classes_of(val) == 2


# --- errors -------------------------------------------------------------------------------------------------------


def test_unknown_names():
    known = r"unknown dataset 'foo'.*'digits', 'fashion_mnist\[:TRAIN:VAL\]', 'torch/NAME'.*folder path"
    with pytest.raises(ValueError, match=known):
        build_dataset("foo", "train", 32)
    with pytest.raises(ValueError, match=r"unknown torchvision dataset 'torch/cifar'.*did you mean cifar10, cifar100"):
        build_dataset("torch/cifar", "train", 32)
    with pytest.raises(ValueError, match=r"did you mean mnist"):
        build_dataset("torch/mnst", "train", 32)


def test_torch_dataset_never_downloads_without_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"torch/cifar10 not found under .*pass --download.*root directory"):
        build_dataset("torch/cifar10", "train", 32, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        build_dataset("digits", "test", 32)
    with pytest.raises(ValueError, match="img_size must be a positive"):
        build_dataset("digits", "train", 0)
    with pytest.raises(ValueError, match="root only applies to torch/NAME"):
        build_dataset("digits", "train", 32, root="/tmp")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        build_loader(build_dataset("digits", "val", 8), 0, train=False)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*missing"):
        build_dataset(tmp_path / "missing", "train", 16)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="dataset path is not a folder"):
        build_dataset(tmp_path / "file.png", "train", 16)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class subfolders in .*empty"):
        build_dataset(empty, "train", 16)
    (empty / "cls").mkdir()
    with pytest.raises(ValueError, match="no images in .*empty: its class subfolders are empty"):
        build_dataset(empty, "train", 16)

    text = tmp_path / "text"
    (text / "cls").mkdir(parents=True)
    (text / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"files in .*text are not images \(e.g. notes.txt\); expected .*\.png"):
        build_dataset(text, "train", 16)

    fake = tmp_path / "fake"
    (fake / "cls").mkdir(parents=True)
    (fake / "cls" / "0.png").write_text("not an image either")
    with pytest.raises(ValueError, match=r"0.png is not a readable image"):
        build_dataset(fake, "train", 16)


def test_split_folder_errors(tmp_path):
    only_train = tmp_path / "only_train"
    write_image_folder(only_train / "train", {"a": 2})
    with pytest.raises(FileNotFoundError, match="has train/ but no val/ or validation/ folder"):
        build_dataset(only_train, "val", 16)
    only_val = tmp_path / "only_val"
    write_image_folder(only_val / "val", {"a": 2})
    with pytest.raises(FileNotFoundError, match="has val/ but no train/ folder"):
        build_dataset(only_val, "train", 16)
    extra = tmp_path / "extra"
    write_image_folder(extra / "train", {"a": 2})
    write_image_folder(extra / "val", {"a": 1, "zebra": 1})
    with pytest.raises(ValueError, match="has classes missing from .*train: zebra"):
        build_dataset(extra, "val", 16)
    single = tmp_path / "single"
    write_image_folder(single, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="too few images to hold out a val split"):
        build_dataset(single, "train", 16)
