"""Export: from a supernet and an `Architecture` to a plain subnet (its family's `Subnet` class), saved and
loaded as data.

`export_subnet` folds the chosen candidates into ordinary layers: msa blocks get qkv rejoined from qk and
v; bconv blocks get the conv weight, its bias and the projection mixed from v, proj and z
(`UnifiedAttention.plain_state`); MLPs keep only their kept units' rows of fc1 and columns of fc2
(`UnifiedMlp.pruned_state`). The family computes the whole state (`Family.subnet_state_dict`: a family folds
what it adds, such as layer scales, and keeps the part of the stem its chosen width uses).
A subnet directory holds `arch.json`, `config.json` and `model.safetensors`; `load_subnet` rebuilds
the modules from the first two (`family` in the config names the subnet class) and loads the tensors, with
no supernet and no pickle.

`timm.create_model("spvit_subnet", subnet_dir=DIR)` loads such a directory too, once this module has
been imported (importing registers the name).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from timm.models import register_model
from torch import nn

from finetune.checkpoint import load_checkpoint
from supernets import Architecture, BlockChoice, GateConfig, Subnet, Supernet, build_supernet
from supernets.architecture import check_fields, check_type
from supernets.checkpoints import load_state_dict_file
from supernets.family import family_named, family_of, family_of_model
from supernets.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "check_onnx_exporter",
    "dense_subnet",
    "export_onnx",
    "export_subnet",
    "load_search_supernet",
    "load_subnet",
    "read_released_architectures",
    "round_mlp",
    "read_subnet_source",
    "save_subnet",
    "subnet_source",
    "subnet_state_dict",
    "with_affine_skips",
]

ARCH = "arch.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "spvit-search subnet"
FORMAT_VERSION = 1
TIMM_NAME = "spvit_subnet"
_RELEASED_FIELDS = ("model", "mixers", "mlp_hidden", "mlp_kept")
_SOURCE_FIELDS = ("model", "pretrained", "checkpoint", "img_size", "num_classes", "model_kwargs")
_SUPERNET_FIELDS = {"model": str, "img_size": int, "num_classes": int, "model_kwargs": dict, "gates": dict}


# -- export -----------------------------------------------------------------------------------------


def export_subnet(net: Supernet, arch: Architecture, fold_bn: bool = False) -> Subnet:
    """The plain model that computes what `net` computes with `arch` fixed, in eval mode.

    With `fold_bn`, every bconv's BN is folded into its conv: the same eval-mode output with one layer
    fewer, but no BN statistics left to adapt when fine-tuning. The subnet holds copies, on `net`'s device.
    """
    net.validate_architecture(arch)
    subnet_class = family_of(net).subnet_class
    with torch.device("meta"):  # structure only: every tensor comes from the supernet below
        subnet = subnet_class(arch, net.model_kwargs)
    _assign_weights(subnet, subnet_state_dict(net, arch))
    subnet.eval()
    return subnet.fold_batch_norm() if fold_bn else subnet


def dense_subnet(model: nn.Module, name: str, model_kwargs: dict[str, Any] | None = None) -> Subnet:
    """timm model `model` (built as `name` with `model_kwargs`) as our own plain modules: the export of its dense
    architecture, which computes what `model` computes (the teacher of module imitation, whose blocks align with a
    subnet's)."""
    net = family_of_model(model).supernet_class(model, name, model_kwargs=model_kwargs)
    return export_subnet(net, net.dense_architecture())


def with_affine_skips(subnet: Subnet) -> Subnet:
    """`subnet` with its identity skip blocks made affine skips that compute the same: each gains a norm whose
    weight and bias are zero (s = 1, t = 0 folded), which fine-tuning then trains."""
    if subnet.arch.skip_mixer == "affine":
        return subnet
    arch = dataclasses.replace(subnet.arch, skip_mixer="affine")
    device = next(subnet.parameters()).device
    with torch.device(device):
        affine = type(subnet).from_config(subnet.config(), arch)
    missing, unexpected = affine.load_state_dict(subnet.state_dict(), strict=False)
    skips = [i for i, b in enumerate(arch.blocks) if b.mixer == "skip"]
    if unexpected or any(not any(k.startswith(f"blocks.{i}.") for i in skips) for k in missing):
        raise RuntimeError(f"affine skips changed more than the skip blocks: {missing[:4]} {unexpected[:4]}")
    with torch.no_grad():
        for key in missing:
            if ".norm1." in key:
                affine.get_parameter(key).zero_()
    affine.train(subnet.training)
    return affine


@torch.no_grad()
def subnet_state_dict(net: Supernet, arch: Architecture) -> dict[str, torch.Tensor]:
    """The state dict of `arch`'s subnet, computed from `net`'s weights by its family (fresh tensors, not views)."""
    return {k: v.detach().clone() for k, v in family_of(net).subnet_state_dict(net, arch).items()}


def _assign_weights(subnet: Subnet, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into a subnet built on the meta device, taking the tensors over (no copy)."""
    subnet.load_state_dict(state, assign=True)
    # A non-persistent buffer is in no state dict: a module that computes its own (timm's protocol for models built
    # on the meta device) computes it where the weights now are; any other would stay an empty meta tensor.
    device = next(iter(state.values())).device
    for module in subnet.modules():
        meta = [name for name, b in module.named_buffers(recurse=False) if b.is_meta]
        if meta and hasattr(module, "init_non_persistent_buffers"):
            for name in meta:
                setattr(module, name, torch.empty_like(getattr(module, name), device=device))
            module.init_non_persistent_buffers()
    left = [name for name, t in [*subnet.named_parameters(), *subnet.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the subnet's {', '.join(left[:4])} are in no state dict; the exporter must compute them")


# -- save and load ----------------------------------------------------------------------------------


def save_subnet(model: Subnet, directory: str | os.PathLike, source: dict[str, Any] | None = None) -> None:
    """Write `arch.json`, `config.json` and `model.safetensors` into `directory`, each file atomically.

    `source` records the dense model the subnet was searched from (`subnet_source`), for fine-tuning.
    """
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS, save(tensors, metadata={"format": FORMAT}))
    config = {"format": FORMAT, "version": FORMAT_VERSION, **model.config()}
    if source is not None:
        config["source"] = source
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2) + "\n")
    model.arch.save(directory / ARCH)


def load_subnet(directory: str | os.PathLike) -> Subnet:
    """The subnet saved in `directory`, in eval mode on the CPU; no supernet and no pickle involved.

    Raises `ValueError` naming the block and field when `arch.json` does not describe the saved weights.
    """
    directory = Path(directory)
    for name in (ARCH, CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"not a subnet directory: {directory / name} is missing")
    config = _read_config(directory / CONFIG)
    arch = Architecture.load(directory / ARCH)
    state = load_state_dict_file(directory / WEIGHTS)  # safetensors: tensors only
    try:
        with torch.device("meta"):
            model = _subnet_class(config).from_config(config, arch)
    except ValueError as e:  # e.g. an arch.json with more blocks than its model has
        raise ValueError(f"{directory}: {e}") from None
    _check_weights_fit(model, state, directory)
    _assign_weights(model, state)
    return model.eval()


def subnet_source(run: str | os.PathLike, arch: Architecture) -> dict[str, Any] | None:
    """The dense model behind a search run's subnet, from the run's `config.json`, as the arguments that
    rebuild it with its weights; None when the run's config cannot be read."""
    try:
        config = json.loads((Path(run) / CONFIG).read_text(encoding="utf-8"))
        checkpoint = config["checkpoint"]
        return {
            "model": arch.model,
            "pretrained": bool(config["pretrained"]),
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "img_size": arch.img_size,
            "num_classes": arch.num_classes,
            "model_kwargs": dict(config["model_kwargs"]),
        }
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def read_subnet_source(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The dense source model recorded in a subnet directory's config, or None if it records none."""
    path = Path(directory) / CONFIG
    try:
        source = json.loads(path.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if source is None:
        return None
    check_type("source", source, dict)
    check_fields("source.", source, _SOURCE_FIELDS)
    check_type("source.model_kwargs", source["model_kwargs"], dict)
    return source


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an spvit-search subnet config (format '{FORMAT}')")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: subnet format version {config.get('version')} is not {FORMAT_VERSION}")
    return {k: v for k, v in config.items() if k not in ("format", "version", "source")}


def _subnet_class(config: dict[str, Any]) -> type[Subnet]:
    """The subnet class of the family a config names (ViT's names none)."""
    return family_named(config.get("family")).subnet_class


def _check_weights_fit(model: Subnet, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Raise a `ValueError` naming the first field of arch.json (or config.json) the weights contradict."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected == found:
        return
    prefix = f"{directory}: {ARCH} does not match {WEIGHTS}"
    saved_depth = len({m.group(1) for m in map(_BLOCK_KEY.match, found) if m})
    if saved_depth != model.arch.depth:
        raise ValueError(f"{prefix}: blocks: {ARCH} has {model.arch.depth} blocks, the weights {saved_depth}")
    for i, choice in enumerate(model.arch.blocks):
        mixer, width = _saved_block(found, i)
        if mixer != choice.mixer:
            raise ValueError(f"{prefix}: blocks[{i}].mixer is '{choice.mixer}', but the weights hold a '{mixer}' block")
        if width != len(choice.mlp_kept):
            raise ValueError(
                f"{prefix}: blocks[{i}].mlp_kept keeps {len(choice.mlp_kept)} hidden units, the weights {width}"
            )
    differences = sorted(set(expected) ^ set(found)) + [k for k in expected if k in found and expected[k] != found[k]]
    details = [f"{k} {found.get(k, 'missing')} vs {expected.get(k, 'unexpected')}" for k in differences[:4]]
    raise ValueError(
        f"{directory}: {WEIGHTS} does not fit {ARCH} and {CONFIG} (img_size, num_classes, model_kwargs or fold_bn): "
        + "; ".join(details)
    )


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def _saved_block(shapes: dict[str, tuple[int, ...]], i: int) -> tuple[str, int | None]:
    """(mixer, MLP width) of block `i` as its saved tensors show them."""
    p = f"blocks.{i}."
    conv = shapes.get(f"{p}mixer.conv.weight")  # (dh, D, k, k)
    mixer = "msa" if f"{p}mixer.qkv.weight" in shapes else "skip" if conv is None else f"bconv{conv[-1]}"
    fc1 = shapes.get(f"{p}mlp.fc1.weight")  # (k, D)
    return mixer, None if fc1 is None else fc1[0]


# -- timm -------------------------------------------------------------------------------------------


@register_model
def spvit_subnet(pretrained: bool = False, subnet_dir: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """timm entry point: `timm.create_model("spvit_subnet", subnet_dir=DIR)` is `load_subnet(DIR)`.

    The weights always come from DIR (a saved subnet is trained by definition), whatever `pretrained` says.
    """
    for timm_argument in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_argument, None)
    if subnet_dir is None:
        raise ValueError(f"{TIMM_NAME} needs subnet_dir=DIR, a directory written by save_subnet or `spvit export`")
    if kwargs:
        raise ValueError(f"{TIMM_NAME} takes only subnet_dir; got {', '.join(sorted(kwargs))}")
    return load_subnet(subnet_dir)


# -- architectures ----------------------------------------------------------------------------------


def read_released_architectures(
    path: str | os.PathLike, img_size: int = 224, num_classes: int = 1000
) -> dict[str, Architecture]:
    """SPViT's released searched architectures as `Architecture`s, from JSON `{name: {model, mixers, mlp_hidden,
    mlp_kept}}` (one list each, a block an entry) or `{name: {model, blocks: [{mixer, mlp_hidden_full, mlp_kept}]}}`
    (a dict a block, as the Swin release is written). They were searched on ImageNet at 224 px, hence the
    defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released architectures not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of named architectures")
    try:
        return {name: _released_architecture(name, entry, img_size, num_classes) for name, entry in data.items()}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _released_architecture(name: str, entry: Any, img_size: int, num_classes: int) -> Architecture:
    if isinstance(entry, dict) and "blocks" in entry:
        entry = _block_lists(name, entry)
    missing = [f for f in _RELEASED_FIELDS if not isinstance(entry, dict) or f not in entry]
    if missing:
        raise ValueError(f"{name}.{missing[0]}: required field is missing")
    mixers, hidden, kept = entry["mixers"], entry["mlp_hidden"], entry["mlp_kept"]
    if not all(isinstance(x, list) for x in (mixers, hidden, kept)) or not len(mixers) == len(hidden) == len(kept):
        raise ValueError(f"{name}: mixers, mlp_hidden and mlp_kept must be lists with one entry per block")
    try:
        blocks = [BlockChoice(m, tuple(sorted(k))) for m, k in zip(mixers, kept, strict=True)]
        arch = Architecture(entry["model"], img_size, num_classes, tuple(blocks))
        arch.validate_for(model=arch.model, img_size=img_size, num_classes=num_classes, mlp_hidden=hidden)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: {e}") from None
    return arch


def _block_lists(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The per-block form of a released architecture as one list per field."""
    blocks = entry["blocks"]
    if not isinstance(blocks, list):
        raise ValueError(f"{name}.blocks: expected a list of blocks")
    lists: dict[str, Any] = {"model": entry.get("model"), "mixers": [], "mlp_hidden": [], "mlp_kept": []}
    for i, block in enumerate(blocks):
        for field, key in (("mixer", "mixers"), ("mlp_hidden_full", "mlp_hidden"), ("mlp_kept", "mlp_kept")):
            if not isinstance(block, dict) or field not in block:
                raise ValueError(f"{name}.blocks[{i}].{field}: required field is missing")
            lists[key].append(block[field])
    return {k: v for k, v in lists.items() if v is not None}


def round_mlp(arch: Architecture, net: Supernet, multiple: int) -> Architecture:
    """`arch` with every MLP width rounded up to a multiple of `multiple` (or to the full width): matrix sizes
    that vector units and GEMM kernels like. The units added back are the most important dropped ones,
    those with the largest gate logits (ties: lowest index first)."""
    if multiple < 1:
        raise ValueError(f"round_mlp: the multiple must be a positive integer, got {multiple}")
    net.validate_architecture(arch)
    blocks = []
    for block, choice in zip(net.blocks[: arch.depth], arch.blocks, strict=True):
        hidden = block.mlp.hidden_features
        width = len(choice.mlp_kept)
        extra = min(-(-width // multiple) * multiple, hidden) - width
        dropped = torch.ones(hidden, dtype=torch.bool)
        dropped[list(choice.mlp_kept)] = False
        dropped = dropped.nonzero().squeeze(1)
        logits = block.mlp.gates.logits.detach().cpu()[dropped]
        added = dropped[torch.sort(logits, descending=True, stable=True).indices[:extra]].tolist()
        blocks.append(BlockChoice(choice.mixer, tuple(sorted([*choice.mlp_kept, *added]))))
    return dataclasses.replace(arch, blocks=tuple(blocks))


# -- search runs ------------------------------------------------------------------------------------


def load_search_supernet(path: str | os.PathLike) -> Supernet:
    """The supernet a search run saved (`supernet.safetensors`), with its searched weights and gates."""
    model_state, state = load_checkpoint(path)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not {"model", "img_size", "num_classes", "model_kwargs", "gates"} <= set(config):
        raise ValueError(f"{path} holds no supernet config; was it written by `spvit search`?")
    try:
        for name, expected in _SUPERNET_FIELDS.items():
            check_type(f"config.{name}", config[name], expected)
        gates = GateConfig(**config["gates"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid supernet config: {e}") from None
    net = build_supernet(
        config["model"],
        img_size=config["img_size"],
        num_classes=config["num_classes"],
        gates=gates,
        **config["model_kwargs"],
    )
    try:
        net.load_state_dict(model_state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors; the first detail line says which
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{path} does not fit the supernet '{config['model']}': {detail}") from None
    return net


# -- ONNX -------------------------------------------------------------------------------------------


def check_onnx_exporter() -> None:
    """Raise a `ValueError` early, before any long work, when torch.onnx's exporter cannot run here."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs {' and '.join(missing)} (pip install onnx onnxscript)")


def export_onnx(model: Subnet, path: str | os.PathLike, tolerance: float = 1e-4) -> float | None:
    """Write `model` (switched to eval mode) as one ONNX file with a dynamic batch size and, where
    onnxruntime is installed, check it.

    Returns onnxruntime's largest absolute logit difference from PyTorch on a random batch of 2, or None
    when onnxruntime is not installed. A difference above `tolerance` (relative to the logits' scale) is
    a `ValueError`: the file would not compute what the model computes.
    """
    check_onnx_exporter()
    model.eval()
    device = next(model.parameters()).device
    image = torch.randn(2, model.in_chans, model.img_size, model.img_size, device=device)
    program = torch.onnx.export(
        model,
        (image,),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        external_data=False,  # one self-contained file; subnets are far below protobuf's 2 GB limit
        verbose=False,
    )
    data = program.model_proto.SerializeToString()
    atomic_write_bytes(path, data)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": image.cpu().numpy()})
    with torch.no_grad():
        expected = model(image).cpu()
    difference = (torch.from_numpy(logits) - expected).abs().max().item()
    if difference > tolerance * max(1.0, expected.abs().max().item()):
        raise ValueError(f"{path}: onnxruntime's logits differ from PyTorch's by up to {difference:.3g}")
    return difference
