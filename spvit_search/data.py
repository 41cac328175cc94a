"""Datasets and loaders, named like timm names them: `digits`, `torch/NAME` or a folder path.

- `digits`: scikit-learn's 1,797 handwritten 8x8 digits (10 classes). They ship inside scikit-learn, so the demo and
  the tests have real data without a download. A fixed stratified 80/20 split, upsampled (bilinear) to the requested
  size, gray repeated to 3 channels.
- `fashion_mnist`: Zalando's Fashion-MNIST (10 classes of 28x28 clothing images, 60,000 train and 10,000 test), read in
  place from the idx files Debian's `dataset-fashion-mnist` package installs (`root` overrides where they are). `val`
  is the test set. Harder than digits, which saturates: the benchmark of search quality. `fashion_mnist:TRAIN:VAL`
  keeps the first TRAIN images of every class from the training file and the first VAL of every class from the test
  file (`fashion_mnist:500:100`: 5,000 and 1,000 images), a subset that a 2-core CPU trains in seconds per epoch.
- `torch/NAME`: a torchvision dataset through timm's `create_dataset` (cifar10, cifar100, mnist, ...). It is fetched
  only when `download=True`; otherwise missing data is a clear error, never a silent download.
- a folder path: images as `<folder>/<class>/<image>` (timm's ImageDataset). Either `<folder>` holds `train/` and
  `val/` (or `validation/`), or it is a single folder of class subfolders, split deterministically 80/20 per class.

Every kind is normalised with timm's ImageNet mean and std, so a model sees the same input statistics whatever the
dataset, and pretrained timm weights see the statistics they were trained with.

Loaders: digits loads in the main process; folders and `torch/NAME` decode images in `default_num_workers` worker
processes that persist across epochs and prefetch, so a GPU is not left waiting for JPEG decoding.
"""

from __future__ import annotations

import difflib
import gzip
import importlib.util
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils import natural_key
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info
from torchvision.transforms import Compose

from .settings import group

SPLITS = ("train", "val")
VAL_FRACTION = 0.2
"""Share of every class held out for `val` (digits, and a folder without train/ and val/)."""
SPLIT_SEED = 0
"""Seed of the held-out split. Fixed, not the run's seed, so every run validates on the same images."""
TORCH_DATASETS = ("cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "qmnist", "places365", "inaturalist")
"""The `torch/NAME` datasets timm's create_dataset builds and torchvision can download (ImageNet: use a folder)."""
DEFAULT_TORCH_ROOT = Path.home() / ".cache" / "spvit-search" / "datasets"
"""Where `torch/NAME` data lives when no root is given."""
MAX_DEFAULT_WORKERS = 8
"""Most worker processes `default_num_workers` gives: enough to keep one GPU fed with ImageNet-sized JPEGs."""
PREFETCH_FACTOR = 4
"""Batches each worker keeps ready. A worker takes about `num_workers` steps to decode one batch, so with PyTorch's
default of 2 a single slow batch (a large JPEG, a page-cache miss) stalls the device; 4 absorbs it for
4 * num_workers batches of host memory."""
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where `apt-get install dataset-fashion-mnist` puts the idx files."""
_FASHION_FILES = {"train": "train", "val": "t10k"}  # idx file prefixes per split
_VAL_DIRS = ("val", "validation")
_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


data_setting = group("data")


@dataclass(kw_only=True)
class DataConfig:
    """The data settings of a command (the run configs inherit them): which dataset, and how it is loaded."""

    data: str = data_setting(
        "digits",
        help="digits (embedded), fashion_mnist (Debian's dataset-fashion-mnist files), torch/NAME, or an image folder",
    )
    data_root: str | None = data_setting(
        None, help="where torch/NAME datasets live, or the fashion_mnist idx files", default_text="their usual place"
    )
    download: bool = data_setting(False, help="allow torch/NAME datasets to download")
    batch_size: int = data_setting(64, help="samples per batch (per process under torchrun)")
    num_workers: int | None = data_setting(
        None, aliases=("--workers",), help="data loader worker processes",
        default_text="in-process for digits and fashion_mnist, min(8, CPUs) for folders and torch/NAME",
    )  # fmt: skip


@dataclass(kw_only=True)
class TrainDataConfig(DataConfig):
    augment: bool = data_setting(True, help="random augmentation of the training split (never of val)")


def build_datasets(config: DataConfig, img_size: int, augment: bool = False) -> tuple[Dataset, Dataset]:
    """The (train, val) splits of `config.data` at `img_size`; `augment` the training split."""
    train = build_dataset(config.data, "train", img_size, config.download, config.data_root, augment)
    val = build_dataset(config.data, "val", img_size, config.download, config.data_root, augment=False)
    return train, val


def build_loaders(
    config: DataConfig, train: Dataset, val: Dataset, seed: int, distributed: bool = False, pin_memory: bool = False
) -> tuple[DataLoader, DataLoader]:
    """The (train, val) loaders a run trains and evaluates with: the training order drawn from `seed` (and split
    over the ranks when `distributed`), `config.num_workers` workers or the dataset's default; `pin_memory` as in
    `build_loader`."""
    workers = loader_workers(config.data, config.num_workers)
    train_loader = build_loader(train, config.batch_size, True, workers, seed, distributed, pin_memory)
    val_loader = build_loader(val, config.batch_size, train=False, num_workers=workers, pin_memory=pin_memory)
    return train_loader, val_loader


def default_num_workers(spec: str | os.PathLike[str]) -> int:
    """Loader workers for a dataset when none are asked for: 0 for digits and fashion_mnist, which are already decoded
    in memory (worker processes would only add start-up time), else one per CPU this process may run on, at most
    MAX_DEFAULT_WORKERS."""
    if os.fspath(spec) == "digits" or _fashion_mnist_spec(os.fspath(spec)) is not None:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_DEFAULT_WORKERS, cpus)


def loader_workers(spec: str | os.PathLike[str], requested: int | None) -> int:
    """The worker processes a run's loaders use: `requested` (`--workers`), else `default_num_workers(spec)`."""
    return default_num_workers(spec) if requested is None else requested


def build_dataset(
    spec: str | os.PathLike[str],
    split: str,
    img_size: int,
    download: bool = False,
    root: str | os.PathLike[str] | None = None,
    augment: bool = True,
) -> Dataset:
    """One split of a dataset as (image (3, img_size, img_size) float tensor, class index) samples.

    `augment` only applies to the train split. `download` only applies to `torch/NAME` datasets, `root` to those and
    to `fashion_mnist`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if img_size < 1:
        raise ValueError(f"img_size must be a positive number of pixels, got {img_size}")
    name = os.fspath(spec)
    augment = augment and split == "train"
    fashion = _fashion_mnist_spec(name)
    if root is not None and not (name.startswith("torch/") or fashion):
        raise ValueError(
            f"root only applies to torch/NAME datasets and fashion_mnist, not {name!r} (a folder is its own path)"
        )
    if name == "digits":
        return DigitsDataset(split, img_size, augment)
    if fashion:
        per_class = fashion.train_per_class if split == "train" else fashion.val_per_class
        return FashionMNISTDataset(split, img_size, augment, root, per_class)
    if name.startswith("torch/"):
        return _torch_dataset(name.removeprefix("torch/"), split, img_size, download, root, augment)
    if "/" in name or os.sep in name or name.startswith((".", "~")) or Path(name).exists():
        return _folder_dataset(Path(name).expanduser(), split, img_size, augment)
    raise ValueError(
        f"unknown dataset {name!r}: use 'digits', 'fashion_mnist[:TRAIN:VAL]', 'torch/NAME' (e.g. torch/cifar10) or a "
        f"folder path"
    )


class FashionMNISTSpec(NamedTuple):
    """`fashion_mnist` or `fashion_mnist:TRAIN:VAL`: images kept per class in each split (None: all)."""

    train_per_class: int | None
    val_per_class: int | None


def _fashion_mnist_spec(name: str) -> FashionMNISTSpec | None:
    """The subset a `fashion_mnist[:TRAIN:VAL]` spec asks for; None for any other spec."""
    if name == "fashion_mnist":
        return FashionMNISTSpec(None, None)
    if not name.startswith("fashion_mnist:"):
        return None
    counts = name.removeprefix("fashion_mnist:").split(":")
    if len(counts) != 2 or not all(c.isdigit() and int(c) > 0 for c in counts):
        raise ValueError(
            f"dataset {name!r}: write fashion_mnist:TRAIN:VAL with the images per class of each split as positive "
            f"integers, e.g. fashion_mnist:500:100"
        )
    return FashionMNISTSpec(int(counts[0]), int(counts[1]))


def num_classes_of(dataset: Dataset) -> int:
    """How many classes a dataset from `build_dataset` has: the size of the classifier head it needs."""
    if isinstance(dataset, Subset | SeededSamples):
        return num_classes_of(dataset.dataset)
    if hasattr(dataset, "classes"):  # DigitsDataset and torchvision datasets
        return len(dataset.classes)
    reader = getattr(dataset, "reader", None)  # timm ImageDataset
    if reader is not None and hasattr(reader, "class_to_idx"):
        return len(reader.class_to_idx)
    raise ValueError(f"cannot tell how many classes a {type(dataset).__name__} has")


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that shuffles reproducibly from `seed` when `train`, with persistent, prefetching workers when
    `num_workers` > 0 and pinned host memory when `pin_memory` (pass `finetune.devices.pin_memory(device)`: only
    CUDA gains from it).

    The sampler is always an `EpochSampler` (a DistributedSampler, a single replica unless `distributed`), so a
    training loop calls `loader.sampler.set_epoch(epoch)` the same way with or without DDP: epoch e is a permutation
    drawn from a torch.Generator seeded with `seed + e`, so a resumed run sees the order an uninterrupted one would,
    and one process sees the order a one-process DDP run would. Without set_epoch every epoch repeats epoch 0's order.
    Distributed val pads each rank to the same length with up to world_size - 1 repeated samples.
    Augmentation in a worker draws from RNGs seeded per sample from (seed, epoch, index) (`SeededSamples`): workers
    persist across epochs, so their own RNGs would carry past epochs' draws into a resumed run. With num_workers=0
    augmentation draws from the global torch RNG, which the training loop seeds and checkpoints.
    A plain DataLoader rather than timm's create_loader, which replaces the dataset's transform and shuffles without
    a seed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed initialised first (init_process_group)")
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    sampler = EpochSampler(dataset, num_replicas=replicas, rank=rank, shuffle=train, seed=seed)
    workers = {"persistent_workers": True, "prefetch_factor": PREFETCH_FACTOR} if num_workers > 0 else {}
    return DataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        **workers,
    )


class SampleKey(NamedTuple):
    """What an `EpochSampler` yields: a sample's index and the epoch it is drawn in."""

    index: int
    epoch: int


class EpochSampler(DistributedSampler):
    """A DistributedSampler that yields `SampleKey(index, epoch)`: the epoch travels with every index to the worker
    that loads it, which persistent workers have no other way to learn."""

    def __iter__(self):
        epoch = self.epoch
        return (SampleKey(index, epoch) for index in super().__iter__())


class SeededSamples(Dataset):
    """`dataset` indexed by `SampleKey`s (or plain indices). In a loader worker, the torch, random and numpy RNGs are
    seeded from (seed, epoch, index) before each sample, so its augmentation depends on nothing else: not on the
    worker that loads it, the epochs that worker loaded before, or where in the epoch a resumed run starts.
    In the main process the global RNGs are left alone: they belong to the training loop."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey | int) -> object:
        if not isinstance(key, SampleKey):
            return self.dataset[key]
        if get_worker_info() is not None:
            _seed_rngs(self.seed, key.epoch, key.index)
        return self.dataset[key.index]


def _seed_rngs(seed: int, epoch: int, index: int) -> None:
    """Seed this process's torch (CPU), random and numpy RNGs from (seed, epoch, index), through a SeedSequence so
    that neighbouring samples get unrelated streams."""
    words = np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(3)  # 3 uint32 words
    torch.default_generator.manual_seed(int(words[0]))
    random.seed(int(words[1]))
    np.random.seed(words[2])


def holdout_split(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, val) index lists: `fraction` of every class, at least one image, goes to val.

    A class with a single image stays in train. Uses its own RNG, so the split ignores the global random state.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(targets)
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(len(members) - 1, max(1, round(fraction * len(members))))
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return sorted(train), sorted(val)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as (3, img_size, img_size) tensors normalised with ImageNet mean and std.

    `indices` are the rows of `load_digits()` this split holds. The upsampled images are computed once per
    (split, img_size) and shared between instances; training augmentation shifts a digit by up to one source pixel
    (img_size // 8) in each direction, filling with background.
    """

    classes = tuple(str(d) for d in range(10))

    def __init__(self, split: str, img_size: int, augment: bool = False) -> None:
        self.images, self.targets, self.indices = _digits_tensors(split, img_size)
        self.augment = augment
        self.pad = max(1, img_size // 8)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]  # (1, S, S) in [0, 1]
        if self.augment:
            image = _random_shift(image, self.pad)
        image = image.expand(3, -1, -1)  # (3, S, S)
        return (image - _MEAN) / _STD, int(self.targets[index])


@lru_cache(maxsize=8)
def _digits_tensors(split: str, img_size: int) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Images (N, 1, S, S) in [0, 1], targets (N,) and source rows of one digits split; cached, never mutate."""
    pixels, labels = load_digits()
    train, val = holdout_split(labels.tolist(), VAL_FRACTION, SPLIT_SEED)
    rows = train if split == "train" else val
    images = torch.from_numpy(pixels[rows]).float().div_(16.0).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8), sklearn's 0..16
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)  # (N, 1, S, S)
    return images, torch.from_numpy(labels[rows]).long(), tuple(rows)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: pixels (1797, 64) in 0..16 and labels (1797,), as `sklearn.datasets.load_digits` reads
    them, from the file scikit-learn ships. Importing scikit-learn would add a second and a half to every start."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--data digits reads the digits that scikit-learn ships: pip install scikit-learn")
    table = np.loadtxt(Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz"), delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as (3, img_size, img_size) tensors normalised with ImageNet mean and std, from the four idx files
    (gzipped or not) in `root`. The 28x28 images stay uint8 in memory and are resized per sample (bilinear), so a
    large `img_size` costs no memory; training augmentation flips horizontally and shifts by up to two source pixels,
    as Fashion-MNIST's own baselines augment. `per_class` keeps the first that many images of every class."""

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(
        self,
        split: str,
        img_size: int,
        augment: bool = False,
        root: str | os.PathLike[str] | None = None,
        per_class: int | None = None,
    ) -> None:
        images, targets = _fashion_mnist_arrays(split, Path(root) if root is not None else FASHION_MNIST_ROOT)
        if per_class is not None:
            rank_in_class = np.zeros_like(targets, dtype=np.int64)
            for label in np.unique(targets):
                members = targets == label
                rank_in_class[members] = np.arange(members.sum())
            keep = rank_in_class < per_class
            images, targets = images[keep], targets[keep]
        self.images, self.targets = images, targets
        self.img_size = img_size
        self.augment = augment
        self.pad = max(1, 2 * img_size // 28)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(self.images[index]).float().div_(255.0)[None, None]  # (1, 1, 28, 28) in [0, 1]
        if image.shape[-1] != self.img_size:
            image = F.interpolate(image, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        image = image[0]  # (1, S, S)
        if self.augment:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            image = _random_shift(image, self.pad)
        return (image.expand(3, -1, -1) - _MEAN) / _STD, int(self.targets[index])


@lru_cache(maxsize=4)
def _fashion_mnist_arrays(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of one split, read from the idx files in `root`; cached."""
    prefix = _FASHION_FILES[split]
    images = _read_idx(root, f"{prefix}-images-idx3-ubyte", dims=3)
    labels = _read_idx(root, f"{prefix}-labels-idx1-ubyte", dims=1)
    if len(images) != len(labels):
        raise ValueError(f"fashion_mnist in {root}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(FashionMNISTDataset.classes):
        raise ValueError(f"fashion_mnist in {root}: label {labels.max()} is not one of the 10 classes")
    return images, labels


def _read_idx(root: Path, name: str, dims: int) -> np.ndarray:
    """An idx file of unsigned bytes (LeCun's MNIST format: magic 0x0000080D, big-endian sizes, then the data), from
    `root/name` or `root/name.gz`."""
    path = next((root / f for f in (name, f"{name}.gz") if (root / f).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"fashion_mnist: no {name}[.gz] in {root}; install it with `apt-get install dataset-fashion-mnist` or "
            f"pass --data-root DIR with the four idx files"
        )
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    header = 4 + 4 * dims
    if len(data) < header or data[:4] != bytes([0, 0, 8, dims]):
        raise ValueError(f"{path} is not an idx file of {dims}-d unsigned bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: its header says {shape}, it holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable, as torch wants


def _random_shift(image: Tensor, pad: int) -> Tensor:
    """Shift (C, S, S) by up to `pad` pixels each way: zero-pad, then crop back at a random offset."""
    size = image.shape[-1]
    padded = F.pad(image, (pad, pad, pad, pad))  # (C, S + 2 pad, S + 2 pad)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[:, dy : dy + size, dx : dx + size]


def _timm_transform(img_size: int, split: str, augment: bool) -> Compose:
    """timm's train transform when augmenting, its no-augmentation train transform otherwise, its eval one for val."""
    return create_transform(img_size, is_training=split == "train", no_aug=not augment)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Gray datasets (MNIST and friends) to 3 channels, as the ImageNet normalisation expects; picklable for workers."""
    return image.convert("RGB")


def _torch_dataset(
    name: str, split: str, img_size: int, download: bool, root: str | os.PathLike[str] | None, augment: bool
) -> Dataset:
    """A torchvision dataset through timm; a missing dataset without `download` is a FileNotFoundError."""
    if name not in TORCH_DATASETS:
        close = difflib.get_close_matches(name, TORCH_DATASETS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown torchvision dataset 'torch/{name}': {hint}supported: {', '.join(TORCH_DATASETS)}")
    folder = Path(root).expanduser() if root is not None else DEFAULT_TORCH_ROOT
    transform = Compose([_to_rgb, _timm_transform(img_size, split, augment)])
    try:
        return create_dataset(f"torch/{name}", root=str(folder), split=split, download=download, transform=transform)
    except (RuntimeError, FileNotFoundError) as err:
        if download:
            raise
        raise FileNotFoundError(
            f"torch/{name} not found under {folder}: pass --download (download=True) to fetch it, "
            "or a root directory that holds it"
        ) from err


def _folder_dataset(folder: Path, split: str, img_size: int, augment: bool) -> Dataset:
    """An ImageFolder-style dataset (timm's ImageDataset) for one split; see `_split_folder` for the layouts."""
    split_dir, holdout = _split_folder(folder, split)
    class_dir = folder / "train" if not holdout else folder
    classes = _check_image_folder(class_dir)
    if split_dir != class_dir:
        extra = sorted(set(_check_image_folder(split_dir)) - set(classes))
        if extra:
            raise ValueError(f"{split_dir} has classes missing from {class_dir}: {', '.join(extra)}")
    dataset = create_dataset(
        "",
        root=str(split_dir),
        split=split,
        search_split=False,
        class_map={name: index for index, name in enumerate(classes)},
        transform=_timm_transform(img_size, split, augment),
    )
    if not holdout:
        return dataset
    train, val = holdout_split([target for _, target in dataset.reader.samples], VAL_FRACTION, SPLIT_SEED)
    if not val:
        raise ValueError(f"{folder}: too few images to hold out a val split; add train/ and val/ folders")
    return Subset(dataset, train if split == "train" else val)


def _split_folder(folder: Path, split: str) -> tuple[Path, bool]:
    """The folder holding `split`, and whether it must be split: train/ + val/ (or validation/), else the folder itself.

    A single folder of class subfolders serves both splits through `holdout_split` (fixed seed, 80/20 per class).
    """
    if not folder.exists():
        raise FileNotFoundError(f"dataset folder not found: {folder} (a dataset is 'digits', 'torch/NAME' or a folder)")
    if not folder.is_dir():
        raise ValueError(f"dataset path is not a folder: {folder}")
    train_dir = folder / "train"
    val_dir = next((folder / name for name in _VAL_DIRS if (folder / name).is_dir()), None)
    if not train_dir.is_dir() and val_dir is None:
        return folder, True
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{folder} has {val_dir.name}/ but no train/ folder")
    if val_dir is None:
        raise FileNotFoundError(f"{folder} has train/ but no val/ or validation/ folder")
    return (train_dir if split == "train" else val_dir), False


def _check_image_folder(folder: Path) -> list[str]:
    """The class names (natural order) of `<folder>/<class>/<image>`, after checking there are decodable images.

    Checks the first image found only, so that a large folder is not read twice; timm skips unreadable files later.
    """
    classes = sorted((path.name for path in folder.iterdir() if path.is_dir()), key=natural_key)
    if not classes:
        raise ValueError(f"no class subfolders in {folder} (expected {folder}/<class>/<image>.png)")
    extensions = get_img_extensions(as_set=True)
    image = other = None
    for path in (path for name in classes for path in sorted((folder / name).iterdir()) if path.is_file()):
        if path.suffix.lower() in extensions:
            image = path
            break
        other = other or path
    if image is None and other is None:
        raise ValueError(f"no images in {folder}: its class subfolders are empty")
    if image is None:
        expected = ", ".join(sorted(extensions))
        raise ValueError(f"files in {folder} are not images (e.g. {other.name}); expected {expected}")
    try:
        with Image.open(image) as opened:
            opened.verify()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{image} is not a readable image ({err})") from err
    return classes
