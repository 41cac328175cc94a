"""Export: from a supernet and an `Architecture` to a plain subnet (its family's `Subnet` class), saved and
loaded as data.

`export_subnet` folds the chosen candidates into ordinary layers: msa blocks get qkv rejoined from qk and
v; bconv blocks get the conv weight, its bias and the projection mixed from v, proj and z
(`UnifiedAttention.plain_state`); MLPs keep only their kept units' rows of fc1 and columns of fc2
(`UnifiedMlp.pruned_state`). The family computes the whole state (`Family.subnet_state_dict`: a family folds
what it adds, such as layer scales, and keeps the part of the stem its chosen width uses).

A subnet directory is a timm model folder: `model.safetensors`, and a `config.json` whose `architecture` is our
entry point `spvit_subnet`, whose `model_args` hold the `Architecture` (as JSON) and `Subnet.config()` (`family`
naming the subnet class), whose `pretrained_cfg` holds timm's preprocessing, and whose `spvit` key the format and
the subnet's `Lineage`; `arch.json` repeats the architecture. `load_subnet` rebuilds the modules from that data and
loads the tensors, with no supernet and no pickle; so do `timm.create_model("local-dir:DIR")`,
`timm.create_model("hf-hub:user/name")` once the folder is uploaded to the Hugging Face Hub, and
`timm.create_model("spvit_subnet", subnet_dir=DIR)`, once this module has been imported (`import spvit_search`
registers the name). Directories of format 1 (all of `Subnet.config()` and `source` at config.json's top level, the
architecture in arch.json alone) still load with `load_subnet` and `subnet_dir=`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from timm.models import PretrainedCfg, load_state_dict_from_hf, register_model
from torch import nn

from finetune.checkpoint import load_checkpoint
from supernets import Architecture, BlockChoice, GateConfig, Subnet, Supernet, build_supernet
from supernets.architecture import check_fields, check_type
from supernets.checkpoints import load_state_dict_file
from supernets.family import family_named, family_of, family_of_model
from supernets.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "Lineage",
    "SubnetConfig",
    "check_onnx_exporter",
    "dense_subnet",
    "export_onnx",
    "export_subnet",
    "load_search_supernet",
    "load_subnet",
    "read_released_architectures",
    "read_subnet_config",
    "read_subnet_lineage",
    "read_subnet_source",
    "round_mlp",
    "save_subnet",
    "subnet_source",
    "subnet_state_dict",
    "with_affine_skips",
]

ARCH = "arch.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "spvit-search subnet"
FORMAT_VERSION = 2  # 1: no timm folder; Subnet.config() and `source` at config.json's top level
TIMM_NAME = "spvit_subnet"
LINEAGE_KEY = "spvit"  # config.json's key of what timm does not read: the format and the lineage
SEARCH_TARGET_UNITS = ("macs", "latency_ms")
_MODEL_ARGS = ("arch", "model_kwargs", "fold_bn")  # and `family`, where the family names itself
# timm's preprocessing settings that a folder's pretrained_cfg carries besides the input size
_PREPROCESSING = ("interpolation", "crop_pct", "crop_mode", "mean", "std")
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


@dataclass(frozen=True)
class Lineage:
    """Where a subnet comes from, as its config.json records it under `spvit` (format 1 recorded `source` alone).

    `source` is the dense model it was searched from, as the arguments that rebuild it with its weights
    (`subnet_source`); `search_run` and `finetune_run` are the run directories that made it (absolute paths when
    they were written); `search_target` is the search's budget, `{"macs": N}` or `{"latency_ms": T}`.
    """

    source: dict[str, Any] | None = None
    search_run: str | None = None
    search_target: dict[str, float] | None = None
    finetune_run: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str) -> Lineage:
        """From parsed JSON, checking every field; a `ValueError` names the bad one after `prefix`."""
        check_fields(prefix, data, (), optional=[f.name for f in dataclasses.fields(cls)])
        source, target = data.get("source"), data.get("search_target")
        if source is not None:
            check_type(f"{prefix}source", source, dict)
            check_fields(f"{prefix}source.", source, _SOURCE_FIELDS)
            check_type(f"{prefix}source.model_kwargs", source["model_kwargs"], dict)
        for name in ("search_run", "finetune_run"):
            if data.get(name) is not None:
                check_type(f"{prefix}{name}", data[name], str)
        if target is not None:
            check_type(f"{prefix}search_target", target, dict)
            check_fields(f"{prefix}search_target.", target, (), optional=SEARCH_TARGET_UNITS)
            for unit, value in target.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{prefix}search_target.{unit}: expected a number, got {value!r:.40}")
        return cls(source, data.get("search_run"), target, data.get("finetune_run"))


@dataclass(frozen=True)
class SubnetConfig:
    """A subnet directory's config.json, read: what rebuilds its modules with the architecture (`Subnet.config()`:
    family, model_kwargs, fold_bn), the architecture (None in format 1, which keeps it in arch.json alone) and the
    lineage."""

    modules: dict[str, Any]
    arch: Architecture | None
    lineage: Lineage


def save_subnet(model: Subnet, directory: str | os.PathLike, lineage: Lineage | None = None) -> None:
    """Write `model.safetensors`, `config.json` and `arch.json` into `directory`, each file atomically.

    config.json is a timm model folder's: `architecture` names our entry point, `model_args` hold the architecture
    and `Subnet.config()`, `pretrained_cfg` timm's preprocessing at the subnet's fixed input size, and `spvit` the
    format and the `lineage` (for fine-tuning, which distils from the dense source). arch.json repeats the
    architecture for the tools that read architectures.
    """
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS, save(tensors, metadata={"format": FORMAT}))
    config = {
        "architecture": TIMM_NAME,
        "num_classes": model.arch.num_classes,
        "num_features": model.head.in_features,  # what the classifier reads, in every family; timm only notes it
        "pretrained_cfg": _pretrained_cfg(model),
        "model_args": {"arch": model.arch.to_dict(), **model.config()},
        LINEAGE_KEY: {"format": FORMAT, "version": FORMAT_VERSION, **(lineage or Lineage()).to_dict()},
    }
    atomic_write_text(directory / CONFIG, _json_text(config) + "\n")
    model.arch.save(directory / ARCH)


def load_subnet(directory: str | os.PathLike) -> Subnet:
    """The subnet saved in `directory` (either format), in eval mode on the CPU; no supernet and no pickle involved.

    The architecture is arch.json's, which must then be the one config.json holds; without arch.json, config.json's.
    Raises `ValueError` naming the file and field when they do not describe the saved weights or each other.
    """
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"not a subnet directory: {directory / name} is missing")
    config = read_subnet_config(directory / CONFIG)
    if config.arch is None and not (directory / ARCH).is_file():
        raise FileNotFoundError(f"not a subnet directory: {directory / ARCH} is missing")
    state = load_state_dict_file(directory / WEIGHTS)  # safetensors: tensors only
    if not (directory / ARCH).is_file():
        return _build_subnet(config.modules, config.arch, state, directory, (f"{CONFIG} model_args.arch", CONFIG))
    arch = Architecture.load(directory / ARCH)
    model = _build_subnet(config.modules, arch, state, directory, (ARCH, CONFIG))
    if config.arch not in (None, arch):
        raise ValueError(
            f"{directory}: {ARCH} and {CONFIG}'s model_args.arch are different architectures (timm reads the second); "
            "save the subnet again"
        )
    return model


def read_subnet_config(path: str | os.PathLike) -> SubnetConfig:
    """A subnet's config.json of either format, checked field by field: a `ValueError` names the file and field."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        if isinstance(config, dict) and isinstance(config.get(LINEAGE_KEY), dict):
            return _timm_folder_config(config)
        if isinstance(config, dict) and config.get("format") == FORMAT:
            return _format_1_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    raise ValueError(
        f"{path} is not an spvit-search subnet config (a timm model folder's with an '{LINEAGE_KEY}' key, or format "
        f"'{FORMAT}')"
    )


def read_subnet_lineage(directory: str | os.PathLike) -> Lineage:
    """Where the subnet saved in `directory` comes from, as its config records it."""
    return read_subnet_config(Path(directory) / CONFIG).lineage


def read_subnet_source(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The dense source model recorded in a subnet directory's config, or None if it records none."""
    return read_subnet_lineage(directory).source


def subnet_source(run: str | os.PathLike, arch: Architecture) -> dict[str, Any] | None:
    """The dense model behind a search run's subnet, from the run's `config.json`, as the arguments that rebuild it
    with its weights; None when the run's config cannot be read."""
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


def _pretrained_cfg(model: Subnet) -> dict[str, Any]:
    """timm's pretrained_cfg of the folder: the source model's preprocessing (timm's defaults for what it does not
    record) at the subnet's fixed input size. Nothing that locates weights: timm adds that as it loads the folder."""
    defaults = dataclasses.asdict(PretrainedCfg())
    preprocessing = {}
    for name in _PREPROCESSING:
        recorded = model.pretrained_cfg.get(name)
        preprocessing[name] = defaults[name] if recorded is None else recorded
    return {
        "input_size": (model.in_chans, model.arch.img_size, model.arch.img_size),
        "fixed_input_size": True,  # the conv candidates work on one token grid
        **preprocessing,
        "num_classes": model.arch.num_classes,
    }


def _timm_folder_config(config: dict[str, Any]) -> SubnetConfig:
    lineage = config[LINEAGE_KEY]
    if lineage.get("format") != FORMAT:
        raise ValueError(f"{LINEAGE_KEY}.format: expected '{FORMAT}', got {lineage.get('format')!r:.40}")
    if lineage.get("version") != FORMAT_VERSION:
        raise ValueError(f"subnet format version {lineage.get('version')!r:.40} is not {FORMAT_VERSION}")
    if config.get("architecture") != TIMM_NAME:
        raise ValueError(
            f"architecture: expected '{TIMM_NAME}', the timm entry point, got {config.get('architecture')!r:.40}"
        )
    modules, arch = _parse_model_args(config.get("model_args"))
    lineage = {k: v for k, v in lineage.items() if k not in ("format", "version")}
    return SubnetConfig(modules, arch, Lineage.from_dict(lineage, f"{LINEAGE_KEY}."))


def _format_1_config(config: dict[str, Any]) -> SubnetConfig:
    """Format 1: `format`, `version`, `Subnet.config()` and `source` at the top level, the architecture in arch.json."""
    if config.get("version") != 1:
        raise ValueError(f"subnet format version {config.get('version')!r:.40} is not 1")
    modules = {k: v for k, v in config.items() if k not in ("format", "version", "source")}
    return SubnetConfig(modules, None, Lineage.from_dict({"source": config.get("source")}, ""))


def _parse_model_args(args: Any) -> tuple[dict[str, Any], Architecture]:
    """(`Subnet.config()`, architecture) from timm's `model_args`: that config with the architecture's JSON form."""
    check_type("model_args", args, dict)
    check_fields("model_args.", args, _MODEL_ARGS, optional=("family",))
    try:
        arch = Architecture.from_dict(args["arch"])
    except ValueError as e:
        raise ValueError(f"model_args.arch: {e}") from None
    return {k: v for k, v in args.items() if k != "arch"}, arch


def _build_subnet(
    modules: dict[str, Any], arch: Architecture, state: dict[str, torch.Tensor], where: Any, names: tuple[str, str]
) -> Subnet:
    """The subnet of `arch` and `modules` (`Subnet.config()`) holding `state`, in eval mode. Errors start with `where`
    (the folder) and name the files (or arguments) `names` the architecture and the config came from."""
    try:
        with torch.device("meta"):
            model = family_named(modules.get("family")).subnet_class.from_config(modules, arch)
    except ValueError as e:  # e.g. an architecture with more blocks than its model has
        raise ValueError(f"{where}: {e}") from None
    _check_weights_fit(model, state, where, names)
    _assign_weights(model, state)
    return model.eval()


def _check_weights_fit(model: Subnet, state: dict[str, torch.Tensor], where: Any, names: tuple[str, str]) -> None:
    """Raise a `ValueError` naming the first field of the architecture (or config) the weights contradict."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected == found:
        return
    arch_name, config_name = names
    prefix = f"{where}: {arch_name} does not match {WEIGHTS}"
    saved_depth = len({m.group(1) for m in map(_BLOCK_KEY.match, found) if m})
    if saved_depth != model.arch.depth:
        raise ValueError(f"{prefix}: blocks: {arch_name} has {model.arch.depth} blocks, the weights {saved_depth}")
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
        f"{where}: {WEIGHTS} does not fit {arch_name} and {config_name} (img_size, num_classes, model_kwargs or "
        "fold_bn): " + "; ".join(details)
    )


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def _saved_block(shapes: dict[str, tuple[int, ...]], i: int) -> tuple[str, int | None]:
    """(mixer, MLP width) of block `i` as its saved tensors show them."""
    p = f"blocks.{i}."
    conv = shapes.get(f"{p}mixer.conv.weight")  # (dh, D, k, k)
    mixer = "msa" if f"{p}mixer.qkv.weight" in shapes else "skip" if conv is None else f"bconv{conv[-1]}"
    fc1 = shapes.get(f"{p}mlp.fc1.weight")  # (k, D)
    return mixer, None if fc1 is None else fc1[0]


def _json_text(value: Any, indent: str = "") -> str:
    """`value` as indented JSON in which a list of numbers stays on one line (an `mlp_kept` of 3,072 indices too),
    and so does each entry of a list of lists or objects (one architecture block a line)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = ",\n".join(f"{inner}{json.dumps(k)}: {_json_text(v, inner)}" for k, v in value.items())
        return "{\n" + items + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(inner + json.dumps(v) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


# -- timm -------------------------------------------------------------------------------------------


@register_model
def spvit_subnet(pretrained: bool = False, subnet_dir: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """timm entry point of saved subnets; `import spvit_search` registers it. Two ways in:

    - `timm.create_model("local-dir:DIR")` or `timm.create_model("hf-hub:user/name")`: timm reads the folder's
      config.json and passes its `model_args` (the architecture and `Subnet.config()`) with a `pretrained_cfg` that
      locates the folder. The subnet is built from the arguments, and its weights are read from the folder's
      model.safetensors (fetched by timm's Hub helper from the Hub);
    - `timm.create_model("spvit_subnet", subnet_dir=DIR)` is `load_subnet(DIR)`, for directories of either format.

    The weights always come from the folder (a saved subnet is trained by definition), whatever `pretrained` says.
    """
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    cache_dir = kwargs.pop("cache_dir", None)
    for timm_argument in ("pretrained_cfg_overlay", "pretrained_model_args"):
        kwargs.pop(timm_argument, None)
    if subnet_dir is not None:
        if kwargs:
            raise ValueError(f"{TIMM_NAME} takes only subnet_dir; got {', '.join(sorted(kwargs))}")
        return load_subnet(subnet_dir)
    folder = pretrained_cfg.get("source") if isinstance(pretrained_cfg, dict) else None
    if folder == "local-dir":
        where = Path(pretrained_cfg["file"])
        state = load_state_dict_file(where / WEIGHTS)
    elif folder == "hf-hub":
        where = pretrained_cfg["hf_hub_id"]
        state = load_state_dict_from_hf(where, filename=WEIGHTS, cache_dir=cache_dir)  # safetensors: tensors only
    else:
        raise ValueError(
            f"{TIMM_NAME} needs subnet_dir=DIR, a directory written by save_subnet or `spvit export`, or such a "
            "directory as a timm model folder: timm.create_model('local-dir:DIR') or ('hf-hub:user/name')"
        )
    try:
        modules, arch = _parse_model_args(kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return _build_subnet(modules, arch, state, where, ("model_args.arch", "model_args"))


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
