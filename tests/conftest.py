"""Shared fixtures: tiny timm ViTs with non-trivial weights, and their supernets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY, randomize_
from safetensors.torch import save_file

from finetune.classification import train_classifier
from spvit_search.data import build_dataset, build_loader
from supernets import VisionTransformerSupernet


@pytest.fixture
def tiny_timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model("test_vit", **TINY))


@pytest.fixture
def tiny_supernet(tiny_timm_vit) -> VisionTransformerSupernet:
    net = VisionTransformerSupernet(copy.deepcopy(tiny_timm_vit), "test_vit", model_kwargs={"patch_size": 4})
    return randomize_(net, seed=1)


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory) -> Path:
    """test_vit (img 32, patch 4) trained two epochs on digits, saved as a timm-format checkpoint."""
    out = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", **TINY)
    train = build_loader(build_dataset("digits", "train", 32), 64, train=True, seed=0)
    val = build_loader(build_dataset("digits", "val", 32), 256, train=False)
    train_classifier(model, train, val, out, epochs=2, lr=2e-3, progress=False)
    save_file(model.state_dict(), str(out / "model.safetensors"))
    return out / "model.safetensors"
