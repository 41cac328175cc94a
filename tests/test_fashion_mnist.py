"""`fashion_mnist`: the idx files read in place (gzipped or not), split, resized and normalised; bad files refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from spvit_search.data import FASHION_MNIST_ROOT, build_dataset, default_num_workers, num_classes_of
from spvit_search.data import _fashion_mnist_arrays as cached_arrays


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_fashion_mnist(root: Path, train: int = 6, val: int = 3, compress: bool = True) -> Path:
    """idx files whose image i is filled with the value 10·i and labelled i mod 10."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", train), ("t10k", val)):
        images = np.stack([np.full((28, 28), 10 * i) for i in range(n)])
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    return root


@pytest.fixture(autouse=True)
def _fresh_cache():
    cached_arrays.cache_clear()  # every test writes its own files at paths pytest may reuse
    yield
    cached_arrays.cache_clear()


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_reads_the_idx_files_of_each_split(tmp_path, compress):
    root = write_fashion_mnist(tmp_path / "fm", compress=compress)
    train = build_dataset("fashion_mnist", "train", 32, root=root, augment=False)
    val = build_dataset("fashion_mnist", "val", 32, root=root)
    assert (len(train), len(val), num_classes_of(train)) == (6, 3, 10)
    image, label = train[4]
    assert image.shape == (3, 32, 32) and label == 4
    # A flat image stays flat through the bilinear resize; each channel is normalised with ImageNet's statistics.
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    expected = (40 / 255 - mean) / std
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected)
    assert val[2][1] == 2  # val is the t10k set


def test_augmentation_flips_and_shifts_only_the_train_split(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    images = np.zeros((1, 28, 28))
    images[0, :, :14] = 255  # left half white: a flip or a shift moves it
    write_idx(root / "train-images-idx3-ubyte", images, compress=False)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(1), compress=False)
    write_idx(root / "t10k-images-idx3-ubyte", images, compress=False)
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(1), compress=False)
    torch.manual_seed(0)
    augmented = build_dataset("fashion_mnist", "train", 28, root=root)
    plain = build_dataset("fashion_mnist", "val", 28, root=root, augment=True)  # val never augments
    draws = {augmented[0][0].numpy().tobytes() for _ in range(20)}
    assert len(draws) > 1
    assert all(torch.equal(plain[0][0], plain[0][0]) for _ in range(3))


def test_missing_and_damaged_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", "train", 32, root=tmp_path)
    root = write_fashion_mnist(tmp_path / "fm", compress=False)
    images = root / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(ValueError, match="is truncated"):
        build_dataset("fashion_mnist", "train", 32, root=root)
    images.write_bytes(b"\x00\x00\x09\x03" + bytes(12))
    cached_arrays.cache_clear()
    with pytest.raises(ValueError, match="not an idx file"):
        build_dataset("fashion_mnist", "train", 32, root=root)
    with pytest.raises(ValueError, match="root only applies to torch/NAME datasets and fashion_mnist"):
        build_dataset("digits", "train", 32, root=root)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_debian_package_files():
    train = build_dataset("fashion_mnist", "train", 32, augment=False)
    val = build_dataset("fashion_mnist", "val", 32)
    assert (len(train), len(val)) == (60_000, 10_000)
    assert sorted(set(train.targets.tolist())) == list(range(10))


def test_a_spec_with_counts_keeps_the_first_images_of_every_class(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", train=40, val=30)  # image i: value 10·i, label i mod 10
    train = build_dataset("fashion_mnist:2:1", "train", 28, root=root, augment=False)
    val = build_dataset("fashion_mnist:2:1", "val", 28, root=root)
    assert sorted(int(t) for t in train.targets) == sorted(list(range(10)) * 2)
    assert train.images[:, 0, 0].tolist() == [10 * i for i in range(20)]  # file order: images 0..19
    assert len(val) == 10 and val.images[:, 0, 0].tolist() == [10 * i for i in range(10)]
    assert default_num_workers("fashion_mnist:2:1") == 0  # decoded in memory, like digits


@pytest.mark.parametrize("spec", ["fashion_mnist:500", "fashion_mnist:0:10", "fashion_mnist:a:b", "fashion_mnist:"])
def test_a_malformed_subset_spec_says_how_to_write_it(spec):
    with pytest.raises(ValueError, match="fashion_mnist:TRAIN:VAL"):
        build_dataset(spec, "train", 32)
