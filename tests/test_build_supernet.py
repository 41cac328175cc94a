"""`build_supernet` and `list_supernets`: names, weights from checkpoints, and clear errors."""

from __future__ import annotations

import os
import pickle

import pytest
import timm
import torch
from helpers import TINY
from safetensors.torch import save_file

from supernets import build_supernet, list_supernets


def test_list_covers_deit_and_vit_and_excludes_other_blocks():
    names = list_supernets()
    for name in ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "test_vit"]:
        assert name in names
    assert "vit_base_patch16_224" in names
    assert "deit_tiny_distilled_patch16_224" not in names  # two heads, not a plain VisionTransformer
    assert "vit_base_patch16_siglip_224" not in names  # attention pooling


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'deit_tiny_patch16'; did you mean deit_tiny_patch16_224"):
        build_supernet("deit_tiny_patch16")


def test_unsupported_timm_model_says_why():
    with pytest.raises(ValueError, match=r"deit_tiny_distilled_patch16_224.*VisionTransformerDistilled"):
        build_supernet("deit_tiny_distilled_patch16_224")


def test_bad_model_kwargs_are_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot build 'test_vit'"):
        build_supernet("test_vit", img_size=30, patch_size=4, no_such_argument=1)


@pytest.fixture
def tiny_state(tiny_timm_vit):
    return tiny_timm_vit.state_dict()


def _logits(model, seed=0):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("form", ["safetensors", "pth", "pth_wrapped", "pth_ddp"])
def test_checkpoint_formats_load_the_same_weights(tmp_path, tiny_timm_vit, tiny_state, form):
    path = tmp_path / ("model.safetensors" if form == "safetensors" else "model.pth")
    if form == "safetensors":
        save_file(tiny_state, str(path))
    elif form == "pth":
        torch.save(tiny_state, path)
    elif form == "pth_wrapped":
        torch.save({"model": tiny_state, "epoch": 3, "args": {"lr": 0.1}}, path)
    else:
        torch.save({f"module.{k}": v for k, v in tiny_state.items()}, path)
    net = build_supernet("test_vit", checkpoint_path=path, **TINY)
    assert (_logits(net) - _logits(tiny_timm_vit)).abs().max() <= 1e-5


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Exploit()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        build_supernet("test_vit", checkpoint_path=path, **TINY)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_state, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(tiny_state, path) if suffix == ".pth" else save_file(tiny_state, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"(truncated or corrupt|not a readable safetensors)"):
        build_supernet("test_vit", checkpoint_path=path, **TINY)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        build_supernet("test_vit", checkpoint_path=tmp_path / "nope.pth", **TINY)


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    other = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2)
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"does not fit this model: missing \(\d+\): blocks\.2"):
        build_supernet("test_vit", checkpoint_path=path, **TINY)


def test_new_class_count_reinitialises_the_head(tmp_path, tiny_timm_vit, tiny_state):
    path = tmp_path / "model.safetensors"
    save_file(tiny_state, str(path))
    with pytest.warns(UserWarning, match="re-initialised"):
        net = build_supernet("test_vit", checkpoint_path=path, img_size=32, patch_size=4, num_classes=3)
    assert net.num_classes == 3 and net.head.out_features == 3
    torch.testing.assert_close(net.blocks[0].mlp.fc1.weight, tiny_timm_vit.blocks[0].mlp.fc1.weight)


def test_checkpoint_at_another_image_size_resamples_position_embeddings(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    save_file(tiny_state, str(path))
    net = build_supernet("test_vit", checkpoint_path=path, img_size=64, patch_size=4, num_classes=10)
    assert net.grid_size == (16, 16) and net.pos_embed.shape == (1, 257, 64)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_pretrained_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either pretrained=True or checkpoint_path"):
        build_supernet("test_vit", pretrained=True, checkpoint_path=tmp_path / "x.pth")
