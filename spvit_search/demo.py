"""`spvit demo`: the main job end to end on the embedded digits data, in a few minutes on a CPU (`--device`).

dense ViT (trained here, cached) → lookup table → search at 0.5x → export → fine-tune with soft KD → eval
and report. Every step writes the same run directories the separate commands write, under `--out`:
`dense/`, `search/`, `subnet/`, `finetune/` and `report/`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save
from torch.utils.data import Dataset

from finetune.classification import train_classifier
from finetune.devices import pin_memory, resolve_device
from lookup_tables import build_lookup_table
from supernets import MIXERS, Architecture, build_supernet
from supernets.checkpoints import load_state_dict_file
from supernets.io import atomic_write_bytes, atomic_write_text

from .data import build_dataset, build_loader, num_classes_of
from .evaluation import describe_model
from .export import export_subnet, load_search_supernet, load_subnet
from .finetuning import FinetuneConfig, run_finetune
from .model_card import save_search_subnet
from .runs import DeviceSettings, RunSettings
from .search import SearchConfig, run_search
from .settings import inherit

DENSE_WEIGHTS = "model.safetensors"
DENSE_SETTINGS = "settings.json"
STEPS = ("search", "subnet", "finetune", "report")  # rebuilt on every run; dense/ is the cache


@dataclass(kw_only=True)
class DemoConfig(DeviceSettings):
    """The demo's settings: `out`, `progress` and `device` are flags of `spvit demo`, the rest its fixed recipe."""

    out: str = inherit(RunSettings, "out", "runs/demo", required=False, help="where the demo's run directories go")
    progress: bool = inherit(RunSettings, "progress")
    data: str = "digits"
    model: str = "test_vit"  # timm's tiny ViT: dim 64, depth 6, 2 heads
    img_size: int = 32
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"patch_size": 4})  # an 8x8 token grid
    dense_epochs: int = 40
    dense_lr: float = 3e-3
    target: str = "0.5x"
    search_epochs: int = 10
    search_lr: float = 5e-4
    gate_lr: float = 0.05
    finetune_epochs: int = 15
    finetune_lr: float = 5e-4
    seed: int = 0


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every step, print what each did, and return the dense and subnet figures."""
    out = Path(config.out)
    device = resolve_device(config.device)
    started = time.perf_counter()
    for name in STEPS:
        shutil.rmtree(out / name, ignore_errors=True)

    train = build_dataset(config.data, "train", config.img_size)
    val = build_dataset(config.data, "val", config.img_size, augment=False)
    classes = num_classes_of(train)
    dense_weights = train_dense_model(config, out / "dense", train, val, classes, device)
    _step(2, "lookup table")
    net = build_supernet(
        config.model, checkpoint_path=dense_weights, img_size=config.img_size, num_classes=classes,
        **config.model_kwargs,
    )  # fmt: skip
    lut = build_lookup_table(net)
    low, high = lut.range()
    dense = lut.dense_flops()
    print(f"   dense {dense / 1e6:.2f} MMACs; the search space spans {low / dense:.3f}x .. {high / dense:.3f}x")

    _step(3, f"search at {config.target} MACs")
    summary = run_search(
        SearchConfig(
            model=config.model, data=config.data, out=str(out / "search"), target=config.target,
            checkpoint=str(dense_weights), img_size=config.img_size, model_kwargs=config.model_kwargs,
            epochs=config.search_epochs, lr=config.search_lr, gate_lr=config.gate_lr, seed=config.seed,
            progress=config.progress, device=str(device),
        )
    )  # fmt: skip
    print(
        f"   {summary['macs'] / 1e6:.2f} MMACs ({summary['macs'] / dense:.3f}x) after {summary['epochs']} epochs; "
        f"blocks {', '.join(f'{n} {m}' for m, n in summary['mixers'].items() if n)}; "
        f"MLP units kept {summary['mlp_kept']:.1%}; val top-1 {summary['val_acc1']:.2f}% before fine-tuning"
    )

    _step(4, "export")
    searched = load_search_supernet(out / "search" / "supernet.safetensors")
    subnet = export_subnet(searched, Architecture.load(out / "search" / "arch.json"))
    for warning in save_search_subnet(subnet, out / "subnet", out / "search", lut, searched.dense_architecture()):
        print(f"   warning: {warning}")
    print(f"   {out / 'subnet'}: {', '.join(f'{subnet.arch.mixers.count(m)} {m}' for m in MIXERS)}")

    _step(5, "fine-tune with soft distillation from the dense model")
    tuned = run_finetune(
        FinetuneConfig(
            subnet=str(out / "subnet"), data=config.data, out=str(out / "finetune"), distillation="soft",
            epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed, progress=config.progress,
            device=str(device),
        )
    )  # fmt: skip
    print(f"   val top-1 {tuned['val_acc1']:.2f}% after {tuned['epochs']} epochs")

    _step(6, "evaluate dense vs subnet, and report")
    val_loader = build_loader(val, 256, train=False, pin_memory=pin_memory(device))
    dense_model = timm.create_model(config.model, img_size=config.img_size, num_classes=classes, **config.model_kwargs)
    dense_model.load_state_dict(load_state_dict_file(dense_weights))
    results = {
        name: describe_model(model.to(device), val_loader, config.img_size, latency_batch=64)
        for name, model in (("dense", dense_model), ("subnet", load_subnet(out / "finetune" / "last")))
    }
    print(comparison_table(results))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    from reports import write_report  # matplotlib, which only the report needs

    report = write_report([out / "search", out / "finetune"], out / "report")
    for warning in report.warnings:
        print(f"   warning: {warning}")
    print(f"   report: {report.out_dir / 'index.html'}")
    print(f"done in {time.perf_counter() - started:.0f} s; runs in {out}/")
    return results


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    dense = results["dense"]
    lines = [f"   {'':8} {'MMACs':>8} {'x dense':>8} {'params':>9} {'top-1':>7} {'top-5':>7} {'ms/64 img':>10}"]
    for name, r in results.items():
        lines.append(
            f"   {name:8} {r['macs'] / 1e6:8.2f} {r['macs'] / dense['macs']:8.3f} {r['params'] / 1e3:8.1f}k "
            f"{r['acc1']:6.2f}% {r['acc5']:6.2f}% {r['latency_ms']:10.2f}"
        )
    return "\n".join(lines)


def train_dense_model(
    config: DemoConfig, directory: Path, train: Dataset, val: Dataset, classes: int, device: torch.device
) -> Path:
    """The dense model's weights, trained on the first run and reused while its settings stay the same."""
    settings = {
        k: v for k, v in asdict(config).items() if k in ("data", "model", "img_size", "model_kwargs", "seed")
    } | {"epochs": config.dense_epochs, "lr": config.dense_lr}
    weights = directory / DENSE_WEIGHTS
    cached = directory / DENSE_SETTINGS
    if weights.is_file() and cached.is_file() and json.loads(cached.read_text()) == settings:
        _step(1, f"dense {config.model}: reusing {weights}")
        return weights
    _step(1, f"train the dense {config.model} on {config.data} for {config.dense_epochs} epochs")
    shutil.rmtree(directory, ignore_errors=True)
    torch.manual_seed(config.seed)
    model = timm.create_model(config.model, img_size=config.img_size, num_classes=classes, **config.model_kwargs)
    metrics = train_classifier(
        model,
        build_loader(train, 64, train=True, seed=config.seed),
        build_loader(val, 256, train=False),
        directory,
        config.dense_epochs,
        lr=config.dense_lr,
        progress=config.progress,
        device=device,
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights, save(tensors))
    atomic_write_text(cached, json.dumps(settings, indent=2) + "\n")
    print(f"   val top-1 {metrics['acc1']:.2f}%; cached in {weights}")
    return weights


def _step(number: int, what: str) -> None:
    print(f"[{number}/6] {what}", flush=True)
