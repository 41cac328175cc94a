"""The model card: a subnet directory's `README.md`, which the Hugging Face Hub shows as the model's page.

It says what the subnet is (per block, its token mixer and the MLP hidden units it kept of the dense model's), what
it costs against the dense model, how accurate and fast it is where a run measured that, how it was made (dense
source, search run and target, fine-tune run) and how timm loads it. Its figures are those of the `summary.json` of
the run that wrote the directory: `spvit export` writes the card with the search run's (`save_search_subnet`),
`spvit finetune` the cards of `best/` and `last/` with its own, once its summary is known.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lookup_tables import LookupTable
from reports.run_files import read_architecture, read_json_object
from reports.run_format import ARCH, BEST, SUMMARY
from supernets import MIXERS, Architecture, Subnet, build_supernet
from supernets.io import atomic_write_text

from .export import SEARCH_TARGET_UNITS, TIMM_NAME, Lineage, save_subnet, subnet_source

README = "README.md"
MIXER_MEANINGS = {
    "msa": "multi-head self-attention",
    "bconv3": "bottleneck convolution, 3x3 kernel, made from the attention's weights",
    "bconv1": "bottleneck convolution, 1x1 kernel, made from the attention's weights",
    "skip": "no token mixer (the residual alone)",
}


@dataclass(frozen=True)
class CardFigures:
    """What a card states about cost, accuracy and speed, each figure as a run's summary.json holds it; None where
    the run did not measure it. MACs and parameters are per image, accuracies percentages on the validation split."""

    macs: int | None = None
    params: int | None = None
    dense_macs: int | None = None
    dense_params: int | None = None
    counted_by: str = ""  # how the MACs and parameters were counted
    accuracy: tuple[tuple[str, float], ...] = ()  # (what was measured, percent)
    latency_ms: float | None = None
    dense_latency_ms: float | None = None
    latency_by: str = ""  # how the latency was measured or predicted


def save_search_subnet(
    subnet: Subnet, out: str | os.PathLike, run: str | os.PathLike, lut: LookupTable, dense: Architecture
) -> list[str]:
    """Save `subnet`, exported from search run `run`, into `out` with its lineage and model card; returns warnings
    about the run's files that could not be read (the card then leaves their figures out).

    The card prices the subnet with the run's lookup table `lut` (`dense`: the dense architecture of its supernet), as
    the run's summary prices the architecture it found (with other skip blocks than the run's, `--skip-mixer`, as
    the table prices the run's); where the subnet has that architecture, the card adds the summary's accuracy of
    the supernet with it fixed and its predicted latency.
    """
    run, warnings = Path(run), []
    summary = read_json_object(run / SUMMARY, warnings, required=False) or {}
    target = {unit: value for unit in SEARCH_TARGET_UNITS if (value := _number(summary, f"target_{unit}")) is not None}
    lineage = Lineage(subnet_source(run, subnet.arch), str(run.resolve()), target or None)
    save_subnet(subnet, out, lineage)
    searched = (run / ARCH).is_file() and read_architecture(run / ARCH, warnings) == subnet.arch
    found = summary if searched else {}
    subnet_arch, dense = (dataclasses.replace(a, skip_mixer=lut.skip_mixer) for a in (subnet.arch, dense))
    accuracy = [
        ("val top-1 of the supernet with this architecture, before fine-tuning", _number(found, "val_acc1")),
        ("val top-5 of the supernet with this architecture, before fine-tuning", _number(found, "val_acc5")),
    ]
    figures = CardFigures(
        macs=lut.flops(subnet_arch),
        params=lut.params(subnet_arch),
        dense_macs=lut.dense_flops(),
        dense_params=lut.params(dense),
        counted_by=f"the search run's lookup table, '{lut.convention}' convention",
        accuracy=tuple((what, value) for what, value in accuracy if value is not None),
        latency_ms=_number(found, "latency_ms"),
        dense_latency_ms=_number(found, "dense_latency_ms"),
        latency_by="predicted by the search run's latency lookup table",
    )
    write_model_card(out, subnet, lineage, figures)
    return warnings


def finetune_figures(summary: dict[str, Any], name: str) -> CardFigures:
    """The figures of the card of a fine-tune run's `best/` or `last/` (`name`), from the run's summary: the costs
    fvcore counts on the module, the accuracy of that epoch's model and of the dense model (or the teacher)."""
    if name == BEST:
        accuracy = [("val top-1 after fine-tuning, at the best epoch", _number(summary, "best_val_acc1"))]
    else:
        accuracy = [
            ("val top-1 after fine-tuning, at the last epoch", _number(summary, "val_acc1")),
            ("val top-5 after fine-tuning, at the last epoch", _number(summary, "val_acc5")),
        ]
    if _number(summary, "dense_val_acc1") is not None:
        accuracy.append(("val top-1 of the dense model (the teacher)", _number(summary, "dense_val_acc1")))
    elif _number(summary, "teacher_val_acc1") is not None:
        accuracy.append(("val top-1 of the teacher", _number(summary, "teacher_val_acc1")))
    return CardFigures(
        macs=_number(summary, "macs"),
        params=_number(summary, "params"),
        dense_macs=_number(summary, "dense_macs"),
        dense_params=_number(summary, "dense_params"),
        counted_by="fvcore on the modules, attention matmuls included",
        accuracy=tuple((what, value) for what, value in accuracy if value is not None),
    )


def write_model_card(directory: str | os.PathLike, subnet: Subnet, lineage: Lineage, figures: CardFigures) -> None:
    """Write `README.md` into `directory`, the card of `subnet` saved there."""
    atomic_write_text(Path(directory) / README, model_card(Path(directory), subnet, lineage, figures))


def model_card(directory: Path, subnet: Subnet, lineage: Lineage, figures: CardFigures) -> str:
    """The card's Markdown, with the Hub's metadata header."""
    arch = subnet.arch
    hidden = dense_mlp_hidden(subnet)
    kept = sum(len(b.mlp_kept) for b in arch.blocks)
    mixers = ", ".join(f"{arch.mixers.count(m)} {m}" for m in reversed(MIXERS) if m in arch.mixers)
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, spvit-search, pruned]",
        "---",
        "",
        f"# A pruned `{arch.model}`",
        "",
        f"`{arch.model}` for {arch.num_classes} classes and {arch.img_size}x{arch.img_size} images, pruned by "
        "spvit-search (SPViT: attention layers pruned into convolutions, MLP hidden units pruned): its "
        f"{arch.depth} blocks' token mixers are {mixers}; {kept:,} of {sum(hidden):,} MLP hidden units are kept.",
        "",
        *_usage(directory, subnet),
        *_costs(figures),
        *_accuracy(figures),
        *_making(subnet, lineage),
        *_architecture(arch, hidden),
    ]
    return "\n".join(lines) + "\n"


def dense_mlp_hidden(subnet: Subnet) -> list[int]:
    """The MLP hidden units of every block of the dense model `subnet` was searched from (a shallower subnet's
    removed blocks included), from its supernet built on the meta device: structure only, no weights."""
    arch = subnet.arch
    with torch.device("meta"):
        net = build_supernet(arch.model, img_size=arch.img_size, num_classes=arch.num_classes, **subnet.model_kwargs)
    return net.mlp_hidden


def _count(n: int) -> str:
    """A count of MACs or parameters as cards write it: every digit, and millions or billions."""
    for scale, unit in ((1e9, "G"), (1e6, "M")):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {unit})"
    return f"{n:,}"


def _percent(value: float) -> str:
    return f"{value:.2f}%"


def _milliseconds(value: float) -> str:
    return f"{value:.3f} ms"


def _usage(directory: Path, subnet: Subnet) -> list[str]:
    cfg, size = subnet.pretrained_cfg, f"{subnet.arch.img_size}x{subnet.arch.img_size}"
    return [
        "## Use with timm",
        "",
        "```python",
        f"import spvit_search  # registers the `{TIMM_NAME}` entry point with timm",
        "import timm",
        "",
        f'model = timm.create_model("local-dir:{directory}").eval()  # this folder',
        f'# uploaded with huggingface_hub.upload_folder(folder_path="{directory}", repo_id="user/name"):',
        'model = timm.create_model("hf-hub:user/name").eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
        "```",
        "",
        "The weights are this folder's `model.safetensors`: no `pretrained=True` needed. The model takes "
        f"{size} images only, as its convolutions work on a fixed token grid. Its preprocessing is the dense model's "
        f"timm config: {cfg.get('interpolation')} resize, mean {json.dumps(cfg.get('mean'))}, std "
        f"{json.dumps(cfg.get('std'))} (`pretrained_cfg` in `config.json`).",
        "",
    ]


def _costs(figures: CardFigures) -> list[str]:
    rows = [
        ("MACs", figures.macs, figures.dense_macs, _count),
        ("parameters", figures.params, figures.dense_params, _count),
        (f"latency, {figures.latency_by}", figures.latency_ms, figures.dense_latency_ms, _milliseconds),
    ]
    table = [
        f"| {what} | {show(pruned)} | {'not recorded' if dense is None else show(dense)} | "
        f"{'' if not dense else f'{pruned / dense:.3f}x'} |"
        for what, pruned, dense, show in rows
        if pruned is not None
    ]
    if not table:
        return ["## Cost", "", "Not recorded.", ""]
    header = ["## Cost", "", "| per image | this subnet | dense model | ratio |", "|---|--:|--:|--:|"]
    return [*header, *table, "", f"MACs (multiply-adds) and parameters as counted by {figures.counted_by}.", ""]


def _accuracy(figures: CardFigures) -> list[str]:
    measured = [f"- {what}: {_percent(value)}" for what, value in figures.accuracy]
    return ["## Accuracy", "", *(measured or ["Not measured."]), ""]


def _making(subnet: Subnet, lineage: Lineage) -> list[str]:
    target = " and ".join(_TARGETS[unit](value) for unit, value in (lineage.search_target or {}).items())
    search = f"run `{lineage.search_run}`" if lineage.search_run else "not recorded"
    finetune = f"run `{lineage.finetune_run}`" if lineage.finetune_run else "none recorded"
    skip = "RIFormer's affine map" if subnet.arch.skip_mixer == "affine" else "nothing (the residual alone)"
    return [
        "## How it was made",
        "",
        f"- dense source model: {_dense_source(lineage.source)}",
        f"- search: {search}{f', target {target}' if target else ''}",
        f"- fine-tuning: {finetune}",
        f"- skip blocks compute {skip}; BN folded into the convolutions: {'yes' if subnet.bn_folded else 'no'}",
        "",
    ]


_TARGETS = {"macs": lambda macs: f"{_count(int(macs))} MACs", "latency_ms": _milliseconds}


def _dense_source(source: dict[str, Any] | None) -> str:
    if source is None:
        return "not recorded"
    if source["checkpoint"]:
        weights = f"weights `{source['checkpoint']}`"
    else:
        weights = "timm's pretrained weights" if source["pretrained"] else "random initial weights"
    kwargs = ", ".join(f"{k}={json.dumps(v)}" for k, v in source["model_kwargs"].items())
    return f"`{source['model']}`{f' ({kwargs})' if kwargs else ''}, {weights}"


def _architecture(arch: Architecture, hidden: Sequence[int]) -> list[str]:
    kept = [len(b.mlp_kept) for b in arch.blocks] + [0] * (len(hidden) - arch.depth)
    mixers = arch.mixers + ["removed"] * (len(hidden) - arch.depth)  # past a shallower subnet's depth
    rows = [
        f"| {i} | {m} | {k:,} / {n:,} ({k / n:.0%}) |"
        for i, (m, k, n) in enumerate(zip(mixers, kept, hidden, strict=True))
    ]
    extras = [f"- {name}: {json.dumps(value)}" for name, value in arch.extras.items()]
    return [
        "## Architecture",
        "",
        "| block | token mixer | MLP hidden units kept |",
        "|--:|---|--:|",
        *rows,
        "",
        *(f"- {m}: {MIXER_MEANINGS[m]}" for m in reversed(MIXERS) if m in arch.mixers),
        *(["", "Choices of the family besides the blocks:", "", *extras] if extras else []),
    ]


def _number(summary: dict[str, Any], key: str) -> Any:
    """`summary[key]` if it is a number (a summary is a file: anything else is left out)."""
    value = summary.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None
