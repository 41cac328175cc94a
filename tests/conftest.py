"""Shared fixtures: tiny timm ViTs with non-trivial weights, and their supernets; the device the suite runs on.

The suite runs on the CPU unless `SPVIT_TEST_DEVICE` names another device (`cuda`, `cuda:1`, `mps`). On the CPU the
GPUs are hidden, so that every `--device auto` (the commands' default) picks the CPU too, in this process and in the
processes the tests start. Tests marked `cpu_only` say why they only make sense there, and are skipped elsewhere.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from filelock import FileLock
from helpers import TINY, random_architecture, randomize_, write_image_folder
from safetensors.torch import save_file

from finetune.classification import train_classifier
from finetune.devices import resolve_device
from spvit_search.cli import main
from spvit_search.data import build_dataset, build_loader
from spvit_search.export import export_subnet, save_subnet
from supernets import VisionTransformerSupernet, build_supernet

TEST_DEVICE = os.environ.get("SPVIT_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CUDA starts lazily: nothing above has looked for a GPU yet
if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs one pytest worker per core: each gets its share of torch threads, and so do the processes it
    # starts (through OMP_NUM_THREADS), so a run resumed in the test process reduces in the same order as the one a
    # killed subprocess began: the bit-identical resume tests rely on it.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cpu_only(reason): the test only makes sense on the CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TEST_DEVICE == "cpu":
        return
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"CPU only: {marker.kwargs.get('reason', '')}"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the suite runs on (`SPVIT_TEST_DEVICE`, default the CPU)."""
    return resolve_device(TEST_DEVICE)


@pytest.fixture
def tiny_timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model("test_vit", **TINY))


@pytest.fixture
def tiny_supernet(tiny_timm_vit) -> VisionTransformerSupernet:
    net = VisionTransformerSupernet(copy.deepcopy(tiny_timm_vit), "test_vit", model_kwargs={"patch_size": 4})
    return randomize_(net, seed=1)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory `build(directory)` fills, built by the first pytest-xdist worker that asks for it and read by
    the others (xdist's recipe for session fixtures: each worker is a process of its own). Without xdist, the run's
    own temporary directory."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the run's directory, which every worker's lies in
    directory = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (directory / ".built").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            build(directory)
            (directory / ".built").touch()
    return directory


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory) -> Path:
    """test_vit (img 32, patch 4) trained two epochs on digits, saved as a timm-format checkpoint."""

    def train(out: Path) -> None:
        torch.manual_seed(0)
        model = timm.create_model("test_vit", **TINY)
        train = build_loader(build_dataset("digits", "train", 32), 64, train=True, seed=0)
        val = build_loader(build_dataset("digits", "val", 32), 256, train=False)
        train_classifier(model, train, val, out / "training", epochs=2, lr=2e-3, progress=False)
        save_file(model.state_dict(), str(out / "model.safetensors"))

    return built_once(tmp_path_factory, "dense", train) / "model.safetensors"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A two-class image-folder dataset of 40 small PNGs: 32 train and 8 val images after the 80/20 hold-out, so a
    run with --batch-size 4 takes 8 steps per epoch."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "data", {"a": 20, "bb": 20})


@pytest.fixture(scope="session")
def folder_subnet(tmp_path_factory) -> Path:
    """A subnet directory of test_vit (img 32, patch 4) for `image_folder`'s 2 classes, random weights and
    architecture, no recorded dense source: `spvit finetune --distillation none` trains it without a teacher."""
    torch.manual_seed(0)
    net = build_supernet("test_vit", img_size=32, num_classes=2, patch_size=4)
    out = tmp_path_factory.mktemp("subnet") / "subnet"
    save_subnet(export_subnet(net, random_architecture(num_classes=2, seed=3)), out)
    return out


@pytest.fixture(scope="session")
def search_run(dense_checkpoint, tmp_path_factory) -> Path:
    """`spvit search` of the dense checkpoint at 0.6x for two epochs (read-only: tests write elsewhere)."""

    def search(out: Path) -> None:
        args = ["search", "--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]
        args += ["--checkpoint", str(dense_checkpoint), "--out", str(out / "run"), "--target", "0.6x"]
        assert main([*args, "--epochs", "2", "--gate-lr", "0.1"]) == 0

    return built_once(tmp_path_factory, "search", search) / "run"


@pytest.fixture(scope="session")
def subnet_dir(search_run, tmp_path_factory) -> Path:
    """`search_run`'s architecture, exported (read-only)."""

    def export(out: Path) -> None:
        assert main(["export", "--run", str(search_run), "--out", str(out / "subnet")]) == 0

    return built_once(tmp_path_factory, "subnet", export) / "subnet"
