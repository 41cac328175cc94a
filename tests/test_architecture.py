"""`Architecture`: JSON round trip, atomic save, and clear errors for malformed or misfitting files."""

from __future__ import annotations

import json

import pytest
from helpers import random_architecture

from supernets import Architecture, BlockChoice


def test_json_round_trip(tmp_path):
    arch = random_architecture()
    assert Architecture.from_json(arch.to_json()) == arch
    arch.save(tmp_path / "arch.json")
    assert Architecture.load(tmp_path / "arch.json") == arch
    assert list(tmp_path.iterdir()) == [tmp_path / "arch.json"]  # no temporary file left behind


def test_json_form_matches_design():
    arch = Architecture("deit_tiny_patch16_224", 224, 1000, (BlockChoice("bconv1", (0, 3, 4, 7)),))
    assert json.loads(arch.to_json()) == {
        "model": "deit_tiny_patch16_224",
        "img_size": 224,
        "num_classes": 1000,
        "blocks": [{"mixer": "bconv1", "mlp_kept": [0, 3, 4, 7]}],
    }


def test_save_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "arch.json"
    old = random_architecture(seed=1)
    old.save(path)

    def failing_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", failing_replace)
    with pytest.raises(OSError):
        random_architecture(seed=2).save(path)
    assert Architecture.load(path) == old
    assert list(tmp_path.iterdir()) == [path]


def _valid() -> dict:
    return random_architecture(depth=2, hidden=8, seed=3).to_dict()


def _with(**changes):
    def make():
        data = _valid()
        for key, value in changes.items():
            if key.startswith("block0_"):
                data["blocks"][0][key[len("block0_") :]] = value
            else:
                data[key] = value
        return data

    return make


MALFORMED = {
    "unknown mixer": (_with(block0_mixer="conv5"), r"blocks\[0\]\.mixer: unknown mixer 'conv5'"),
    "unsorted kept": (_with(block0_mlp_kept=[3, 1, 2]), r"blocks\[0\]\.mlp_kept: .*sorted"),
    "duplicated kept": (_with(block0_mlp_kept=[1, 2, 2]), r"blocks\[0\]\.mlp_kept: index 2 is duplicated"),
    "negative kept": (_with(block0_mlp_kept=[-1, 2]), r"blocks\[0\]\.mlp_kept: index -1 is negative"),
    "float index": (_with(block0_mlp_kept=[1.5]), r"blocks\[0\]\.mlp_kept\[0\]: expected int"),
    "missing mixer": (lambda: {**_valid(), "blocks": [{"mlp_kept": [1]}]}, r"blocks\[0\]\.mixer: required"),
    "unknown block field": (_with(block0_heads=3), r"blocks\[0\]\.heads: unknown field"),
    "missing model": (lambda: {k: v for k, v in _valid().items() if k != "model"}, r"model: required"),
    "unknown top field": (_with(depth=3), r"depth: unknown field"),
    "bad img_size": (_with(img_size="224"), r"img_size: expected int"),
    "zero classes": (_with(num_classes=0), r"num_classes: must be positive"),
    "no blocks": (_with(blocks=[]), r"blocks: .*at least one block"),
    "blocks not a list": (_with(blocks={"mixer": "msa"}), r"blocks: expected list"),
    "not an object": (lambda: [1, 2], r"must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_gives_clear_error(tmp_path, case):
    make, message = MALFORMED[case]
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(make()))
    with pytest.raises(ValueError, match=message) as info:
        Architecture.load(path)
    assert str(path) in str(info.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text('{"model": "test_vit", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        Architecture.load(path)
    with pytest.raises(FileNotFoundError, match="architecture file not found"):
        Architecture.load(tmp_path / "missing.json")


MISFITS = {
    "wrong block count": (lambda a: a.to_dict() | {"blocks": a.to_dict()["blocks"][:5]}, r"blocks: .*5 blocks.*has 6"),
    "kept out of range": (
        lambda a: a.to_dict() | {"blocks": [{"mixer": "msa", "mlp_kept": [0, 192]}] + a.to_dict()["blocks"][1:]},
        r"blocks\[0\]\.mlp_kept: index 192 is out of range for hidden size 192",
    ),
    "other model": (lambda a: a.to_dict() | {"model": "deit_tiny_patch16_224"}, r"model: .*deit_tiny.*test_vit"),
    "other img_size": (lambda a: a.to_dict() | {"img_size": 64}, r"img_size: architecture is for 64"),
    "other classes": (lambda a: a.to_dict() | {"num_classes": 100}, r"num_classes: .*100 classes"),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_architecture_that_does_not_fit_the_supernet(tiny_supernet, case):
    change, message = MISFITS[case]
    arch = Architecture.from_dict(change(tiny_supernet.dense_architecture()))
    with pytest.raises(ValueError, match=message):
        tiny_supernet.fix_architecture(arch)
    assert tiny_supernet.fixed_architecture is None
