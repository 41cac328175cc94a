"""Shared fixtures: tiny timm ViTs with non-trivial weights, and their supernets."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import TINY, randomize_

from supernets import VisionTransformerSupernet


@pytest.fixture
def tiny_timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model("test_vit", **TINY))


@pytest.fixture
def tiny_supernet(tiny_timm_vit) -> VisionTransformerSupernet:
    net = VisionTransformerSupernet(copy.deepcopy(tiny_timm_vit), "test_vit", model_kwargs={"patch_size": 4})
    return randomize_(net, seed=1)
