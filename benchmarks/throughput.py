"""Throughput: images/s of the toolkit's own training and eval steps on one device, side by side and as ratios.

What it measures, per model (timm's `deit_tiny_patch16_224` and `deit_small_patch16_224` at 224 px, random weights,
1000 classes; nothing is downloaded) and per variant (mixed precision `--amp`, `torch.compile` on/off):

- dense: one `Engine.train_step` of the timm model with `ClassificationTask` (cross-entropy, label smoothing 0.1,
  fused AdamW, gradient clipping at 5), the step `train_classifier` runs: the baseline.
- search: one `Engine.train_step` of the supernet with `SearchTask`, assembled as `spvit search` assembles it
  (gates at their initial value and sampled from a device generator, cross-entropy plus the complexity loss of
  the lookup table's differentiable MACs at a 0.5x target, AdamW on the weights and on the gates); compiled, as
  `spvit search --compile` runs it (graph breaks at the gate draws), and a failing compile is reported in one line.
- finetune: one `Engine.train_step` of a 0.5x subnet with `DistillationTask` and soft KD from the dense teacher
  (the teacher's no-grad forward included), as `spvit finetune` runs it. The architecture: every gate logit
  drawn from N(0, 1) and `project_to_budget` to 0.5x of the dense MACs (as `subnet_speed.py` draws them), checked
  to be within 2% of 0.5x in the lookup table, then `export_subnet` (BN not folded: the form fine-tuning trains).
- eval dense / eval 0.5x: one forward of the batch under `torch.inference_mode()` of a copy of the dense model and
  of the subnet in eval mode, compiled with `torch.compile` in the compiled variant as `spvit eval --compile` does;
  under `--amp bf16` the forward runs under autocast (`spvit eval` itself runs float32).
- loader: the data loader alone, `spvit_search.data.build_dataset`/`build_loader` over a synthetic image folder of
  JPEGs of the model's size in a temporary directory, with the train augmentation, the default workers
  (`default_num_workers`) and pinned memory on CUDA, each batch copied to the device. A training step whose images/s is
  above the loader's is input-bound: the tables name those steps (on the CPU the loader's workers and the step
  share the cores, so there both figures are upper bounds).

Ratios: search ÷ dense time per step (target <= 1.10 on deit_small at batch 16 on the CPU, <= 1.15 on a GPU
with bf16 at batch 128), fine-tune ÷ dense images/s (target >= 1.6 on a GPU) and eval 0.5x ÷ eval dense images/s.

How. Every timed call is bracketed by `synchronize`, so a GPU's queued kernels count in the step that queued
them. All steps of one model (every variant) run in one process and are interleaved: after the warm-up rounds,
every round runs each step once, in an order rotated every round, so that machine noise falls on all alike; the
figures are the median (and min) seconds per step over the timed rounds and images/s = batch / that. A
compiled step compiles during its warm-up (its first call's time is recorded) and is timed in `--compile-steps`
rounds, fewer than the eager steps' `--steps` by default, because compiling dominates a CPU run: it drops out of
the later rounds (on 2 CPU cores a compiled step's first call takes 15-60 s, a deit_small eager round about 12 s
with amp none and bf16). Batches are random images, on the device before `train_step`.

Run from the repository root: `.venv/bin/python benchmarks/throughput.py [--device cuda] [--update-results]`;
`--quick` is a smoke run in seconds (timm's `test_vit` at 32 px, eager unless `--compile off on`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from results_md import machine_description, save_results
from subnet_speed import random_gate_logits_
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.classification import ClassificationTask
from finetune.devices import AMP_MODES, autocast, pin_memory, resolve_device, to_device
from finetune.distillation import DistillationLoss
from finetune.distributed import DistributedContext
from finetune.engine import Engine, EngineConfig
from finetune.optim import adamw, weight_decay_groups
from finetune.schedule import warmup_cosine
from lookup_tables import LookupTable, build_lookup_table
from spvit_search.complexity import ComplexityLoss, parse_budget
from spvit_search.data import build_dataset, build_loader, default_num_workers
from spvit_search.export import export_subnet
from spvit_search.finetuning import DistillationTask, FinetuneConfig, build_teacher
from spvit_search.projection import project_to_budget
from spvit_search.search import SearchConfig, SearchTask
from supernets import MIXERS, GateConfig, build_supernet
from supernets.devices import device_name, synchronize
from supernets.registry import create_source_model

BENCHMARKS = Path(__file__).resolve().parent
BUDGET = 0.5  # the subnet's and the search target's MACs, x dense
BUDGET_TOLERANCE = 0.02  # relative: the projected subnet's MACs must be within 2% of BUDGET x dense
SEARCH_TARGET = 1.10  # search ÷ dense time per step, deit_small at batch 16 on the CPU
SEARCH_TARGET_GPU = 1.15  # the same at batch 128 with bf16 on a GPU
FINETUNE_TARGET_GPU = 1.6  # fine-tune ÷ dense images/s on a GPU
TARGET_MODEL = "deit_small_patch16_224"
SEED = 0
LOADER_CLASSES = 4
TRAIN_STEPS = ("dense", "search", "finetune")  # the steps a train loader feeds
STEPS = (*TRAIN_STEPS, "eval dense", "eval 0.5x")
COMPILE = ("off", "on")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: timm name and the keyword arguments of `timm.create_model`."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def img_size(self) -> int:
        return self.kwargs.get("img_size", 224)

    @property
    def num_classes(self) -> int:
        return self.kwargs.get("num_classes", 1000)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The other timm arguments (e.g. patch_size), as a supernet or a subnet's source records them."""
        return {k: v for k, v in self.kwargs.items() if k not in ("img_size", "num_classes")}


MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("deit_tiny_patch16_224"),
        ModelSpec(TARGET_MODEL),
        ModelSpec("test_vit", {"img_size": 32, "patch_size": 4, "num_classes": 10}),  # --quick
    )
}


@dataclass(frozen=True)
class Variant:
    """What a step runs under: the autocast mode and whether the model is compiled."""

    amp: str
    compile: bool


# -- the models -------------------------------------------------------------------------------------


def source_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """`create_source_model`/`build_supernet` arguments of `spec` (random weights)."""
    return {"img_size": spec.img_size, "num_classes": spec.num_classes, **spec.model_kwargs}


def dense_source(spec: ModelSpec) -> dict[str, Any]:
    """The `source` record `spvit export` writes for a subnet of `spec`'s random dense model: the fine-tune's
    default teacher is built from it."""
    return {"model": spec.name, "pretrained": False, "checkpoint": None, "img_size": spec.img_size,
            "num_classes": spec.num_classes, "model_kwargs": spec.model_kwargs}  # fmt: skip


def half_subnet(spec: ModelSpec) -> tuple[nn.Module, nn.Module, LookupTable]:
    """A 0.5x subnet (random N(0, 1) gate logits projected to the budget, then exported), the supernet it was
    exported from and its lookup table."""
    net = build_supernet(spec.name, **source_kwargs(spec))
    lut = build_lookup_table(net, "fvcore")
    random_gate_logits_(net, SEED)
    target = int(BUDGET * lut.dense_flops())
    arch = project_to_budget(net, lut, target)
    if abs(lut.flops(arch) / target - 1) > BUDGET_TOLERANCE:
        raise RuntimeError(f"{spec.name}: the projected subnet has {lut.flops(arch) / lut.dense_flops():.3f}x MACs")
    return export_subnet(net, arch), net, lut


def engine_config(out: Path, device: torch.device, variant: Variant, search: bool = False) -> EngineConfig:
    """The run settings the toolkit's defaults give (clip 5, no progress bar)."""
    return EngineConfig(
        out, epochs=1, grad_clip=5.0, progress=False, device=device, amp=variant.amp, compile=variant.compile,
        find_unused_parameters=search,
    )  # fmt: skip


def dense_engine(model: nn.Module, loader: DataLoader, config: EngineConfig) -> Engine:
    """`train_classifier`'s engine: ClassificationTask, AdamW with timm's decay groups, warmup-cosine."""
    optimizer = adamw(weight_decay_groups(model, 0.05), lr=1e-3)
    scheduler = warmup_cosine(optimizer, 10**6, 0)
    task = ClassificationTask(loader, label_smoothing=0.1)
    return Engine(model, task, {"weights": optimizer}, {"weights": scheduler}, loader, config)


def search_engine(spec: ModelSpec, lut: LookupTable, loader: DataLoader, config: EngineConfig) -> Engine:
    """`spvit search`'s engine (see `spvit_search.search._search`) with its default settings at a 0.5x target."""
    settings = SearchConfig(model=spec.name, target=f"{BUDGET}x")
    gates = GateConfig(settings.gate_init, settings.gate_temperature, settings.head_mix_temperature)
    net = build_supernet(spec.name, gates=gates, **source_kwargs(spec)).to(config.device)
    generator = torch.Generator(device=config.device).manual_seed(SEED)
    net.set_gate_generator(generator)
    gate_logits = net.gate_parameters()
    optimizers = {
        "weights": adamw(weight_decay_groups(net, settings.weight_decay, exclude=gate_logits), lr=settings.lr),
        "gates": adamw(gate_logits, lr=settings.gate_lr),
    }
    schedulers = {"weights": warmup_cosine(optimizers["weights"], 10**6, 0)}
    complexity = ComplexityLoss(
        parse_budget(settings.target, lut.dense_flops()), settings.complexity_loss, settings.lam,
        settings.lambda_lr, settings.tolerance,
    )  # fmt: skip
    task = SearchTask(net, lut, complexity, loader, settings, config.out_dir, DistributedContext(), generator)
    return Engine(net, task, optimizers, schedulers, loader, config)


def finetune_engine(subnet: nn.Module, teacher: nn.Module, loader: DataLoader, config: EngineConfig) -> Engine:
    """`spvit finetune`'s engine with its defaults: soft KD (alpha 0.5, tau 1) from the dense teacher."""
    settings = FinetuneConfig(subnet="")
    optimizer = adamw(weight_decay_groups(subnet, settings.weight_decay), lr=settings.lr)
    scheduler = warmup_cosine(optimizer, 10**6, 0)
    loss = DistillationLoss("soft", settings.distillation_alpha, settings.distillation_tau, settings.label_smoothing)
    task = DistillationTask(teacher, loss, loader, config.out_dir, None)
    return Engine(subnet, task, {"weights": optimizer}, {"weights": scheduler}, loader, config)


def eval_step(model: nn.Module, images: torch.Tensor, variant: Variant) -> Callable[[], None]:
    """One inference forward of a copy of `model` in eval mode (compiled in a compiled variant)."""
    model = copy.deepcopy(model).eval()
    forward = torch.compile(model) if variant.compile else model

    def step() -> None:
        with torch.inference_mode(), autocast(images.device, variant.amp):
            forward(images)

    return step


def build_steps(
    spec: ModelSpec, variants: list[Variant], batch: int, device: torch.device, out: Path
) -> tuple[dict[tuple[Variant, str], Callable[[], None]], dict[str, Any]]:
    """Every (variant, step) of one model as a callable, and what was built (parameters, the subnet's MACs).

    The variants share the dense model, the subnet and the teacher (each has its own engine and optimizer); every
    variant searches its own supernet."""
    torch.manual_seed(SEED)
    images = torch.randn(batch, 3, spec.img_size, spec.img_size)
    labels = torch.randint(0, spec.num_classes, (batch,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch, generator=torch.Generator().manual_seed(0))
    data = to_device(next(iter(loader)), device)
    dense = create_source_model(spec.name, **source_kwargs(spec)).to(device)
    subnet, supernet, lut = half_subnet(spec)
    subnet.to(device)
    teacher = build_teacher(FinetuneConfig(subnet=""), subnet, dense_source(spec)).to(device)
    steps: dict[tuple[Variant, str], Callable[[], None]] = {}
    for variant in variants:
        run = out / f"amp-{variant.amp}-compile-{variant.compile}"
        engines = {
            "dense": dense_engine(dense, loader, engine_config(run / "dense", device, variant)),
            "search": search_engine(spec, lut, loader, engine_config(run / "search", device, variant, search=True)),
            "finetune": finetune_engine(subnet, teacher, loader, engine_config(run / "finetune", device, variant)),
        }
        for name, engine in engines.items():
            steps[variant, name] = lambda engine=engine: engine.train_step(data)
        steps[variant, "eval dense"] = eval_step(dense, data[0], variant)
        steps[variant, "eval 0.5x"] = eval_step(subnet, data[0], variant)
    info = {
        "params": {"dense": _params(dense), "supernet": _params(supernet), "subnet": _params(subnet)},
        "subnet_macs_x_dense": lut.flops(subnet.arch) / lut.dense_flops(),
        "subnet_mixers": {m: subnet.arch.mixers.count(m) for m in MIXERS},
    }
    return steps, info


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing -----------------------------------------------------------------------------------------


def time_steps(
    steps: dict[Any, Callable[[], None]], rounds: dict[Any, int], warmup: int, device: torch.device, may_fail: set
) -> tuple[dict[Any, list[float]], dict[Any, str]]:
    """Seconds of every call of every step, the `warmup` untimed rounds' first: then come rounds in which each step
    that still has timed rounds left (`rounds[key]`) runs once, the order rotated every round. A step in `may_fail`
    that raises is dropped, and the first line of its error returned."""
    keys = list(steps)
    times: dict[Any, list[float]] = {key: [] for key in keys}
    failures: dict[Any, str] = {}
    for r in range(warmup + max(rounds.values())):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            if r >= warmup + rounds[key] or key in failures:
                continue
            synchronize(device)
            start = time.perf_counter()
            try:
                steps[key]()
                synchronize(device)
            except Exception as e:  # any compiler error: the step is reported as failed
                if key not in may_fail:
                    raise
                failures[key] = f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')}"[:300]
                continue
            times[key].append(time.perf_counter() - start)
    return {k: v for k, v in times.items() if k not in failures}, failures


def figures(seconds: list[float], warmup: int, batch: int) -> dict[str, Any]:
    """Median and min of the timed calls (after `warmup`); the first call's time shows what compiling took."""
    first, seconds = seconds[0], seconds[warmup:]
    median, best = statistics.median(seconds), min(seconds)
    return {
        "first_call_s": first,
        "s_per_step_median": median,
        "s_per_step_min": best,
        "images_per_s_median": batch / median,
        "images_per_s_max": batch / best,
        "steps": len(seconds),
    }


def write_image_folder(folder: Path, images: int, size: int) -> None:
    """`images` JPEGs of `size` px (smooth random colour fields, which compress like photographs do, unlike noise)
    spread over LOADER_CLASSES classes in train/, and one per class in val/."""
    rng = np.random.default_rng(SEED)
    for split, count in (("train", images), ("val", LOADER_CLASSES)):
        for i in range(count):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
            path = folder / split / f"class{i % LOADER_CLASSES}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=90)


def measure_loader(img_size: int, batch_size: int, batches: int, epochs: int, device: torch.device) -> dict[str, Any]:
    """Images/s of the train loader alone (augmentation, default workers, the copy to `device`): one untimed
    epoch starts the persistent workers, then the median (and max) over `epochs` timed epochs of `batches`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_image_folder(folder, batch_size * batches, img_size)
        dataset = build_dataset(folder, "train", img_size)
        workers = default_num_workers(folder)
        loader = build_loader(dataset, batch_size, True, workers, SEED, pin_memory=pin_memory(device))
        rates = []
        for epoch in range(1 + epochs):
            loader.sampler.set_epoch(epoch)
            start = time.perf_counter()
            for batch in loader:
                to_device(batch, device)
            synchronize(device)
            if epoch:
                rates.append(len(dataset) / (time.perf_counter() - start))
        del loader  # stops the persistent workers before the folder goes
    return {
        "images_per_s_median": statistics.median(rates),
        "images_per_s_max": max(rates),
        "workers": workers,
        "epochs": epochs,
        "images_per_epoch": len(dataset),
        "img_size": img_size,
    }


# -- the report -------------------------------------------------------------------------------------


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """search ÷ dense time per step, fine-tune ÷ dense and eval 0.5x ÷ eval dense images/s of one variant (no
    search ratio when its compiled search failed)."""
    search = rows.get("search")
    med = "images_per_s_median"
    return {
        "search_time_x_dense": search["s_per_step_median"] / rows["dense"]["s_per_step_median"] if search else None,
        "search_time_x_dense_min": search["s_per_step_min"] / rows["dense"]["s_per_step_min"] if search else None,
        "finetune_images_x_dense": rows["finetune"][med] / rows["dense"][med],
        "eval_images_x_dense": rows["eval 0.5x"][med] / rows["eval dense"][med],
    }


def summarize(
    spec: ModelSpec,
    variants: list[Variant],
    times: dict[tuple[Variant, str], list[float]],
    failures: dict[tuple[Variant, str], str],
    warmup: int,
    batch: int,
) -> list[dict[str, Any]]:
    """One row per variant: every step's figures, the ratios, and the steps that failed (why, in one line)."""
    rows = []
    for variant in variants:
        steps = {name: figures(times[variant, name], warmup, batch) for name in STEPS if (variant, name) in times}
        failed = {name: failures[variant, name] for name in STEPS if (variant, name) in failures}
        row = {"model": spec.name, "amp": variant.amp, "compile": variant.compile, "steps": steps, "failed": failed}
        rows.append(row | {"ratios": ratios(steps)})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def check_mark(row: dict[str, Any], device: torch.device, batch: int) -> str:
    """Whether a row meets the issue's targets, for the rows a target is about (deit_small eager)."""
    if row["model"] != TARGET_MODEL or row["compile"]:
        return ""
    search = row["ratios"]["search_time_x_dense"]
    if search is None:
        return ""
    if device.type == "cpu" and batch == 16 and row["amp"] == "none":
        return "yes" if search <= SEARCH_TARGET else "no"
    if device.type == "cuda" and batch == 128 and row["amp"] == "bf16":
        finetune = row["ratios"]["finetune_images_x_dense"]
        return "yes" if search <= SEARCH_TARGET_GPU and finetune >= FINETUNE_TARGET_GPU else "no"
    return ""


def input_bound(row: dict[str, Any], loader: dict[str, Any]) -> list[str]:
    """The training steps of a row that take images faster than the train loader alone delivers them."""
    rate = loader["images_per_s_median"]
    return [name for name in TRAIN_STEPS if name in row["steps"] and row["steps"][name]["images_per_s_median"] > rate]


def markdown_tables(results: dict[str, Any], device: torch.device) -> str:
    """A table of every step's images/s, one of the ratios, and the loader's figure."""
    batch, loader = results["batch"], results["loader"]
    steps = [
        f"| model | amp | compile | {' | '.join(f'{s} img/s (ms/step)' for s in STEPS)} | input-bound |",
        "|---|---|---|" + "---:|" * len(STEPS) + "---|",
    ]
    for row in results["rows"]:
        cells = [
            f"{f['images_per_s_median']:.1f} ({1e3 * f['s_per_step_median']:.0f})" if f else "failed"
            for f in (row["steps"].get(name) for name in STEPS)
        ]
        bound = ", ".join(input_bound(row, loader)) or "none"
        steps.append(f"| {row['model']} | {row['amp']} | {_on_off(row['compile'])} | {' | '.join(cells)} | {bound} |")
    ratio_lines = [
        "| model | amp | compile | search ÷ dense time median (min) | fine-tune 0.5x ÷ dense img/s "
        "| eval 0.5x ÷ dense img/s | targets met |",
        "|---|---|---|---:|---:|---:|:---:|",
    ]
    for row in results["rows"]:
        r = row["ratios"]
        ratio_lines.append(
            f"| {row['model']} | {row['amp']} | {_on_off(row['compile'])} "
            f"| **{_fmt(r['search_time_x_dense'], '.2f')}x** ({_fmt(r['search_time_x_dense_min'], '.2f')}x) "
            f"| **{r['finetune_images_x_dense']:.2f}x** | {r['eval_images_x_dense']:.2f}x "
            f"| {check_mark(row, device, batch)} |"
        )
    failures = [
        f"- {row['model']}, amp {row['amp']}, compile {_on_off(row['compile'])}: {name} failed: {why}"
        for row in results["rows"]
        for name, why in row["failed"].items()
    ]
    loader_line = (
        f"Loader alone (train augmentation, {loader['workers']} workers, {loader['img_size']} px JPEGs, copied to the "
        f"device): **{loader['images_per_s_median']:.0f} img/s** median ({loader['images_per_s_max']:.0f} max) over "
        f"{loader['epochs']} epochs of {loader['images_per_epoch']} images."
    )
    tables = "\n".join(steps) + "\n\n" + "\n".join(ratio_lines)
    return tables + ("\n\n" + "\n".join(failures) if failures else "") + "\n\n" + loader_line


def _on_off(compiled: bool) -> str:
    return "on" if compiled else "off"


def results_body(results: dict[str, Any], device: torch.device) -> str:
    """The part of the RESULTS.md section a fresh run replaces: provenance and the tables."""
    compiled = f", compiled steps {results['compile_steps']}" if results["compile_steps"] != results["steps"] else ""
    header = (
        f"Measured {results['date']} on {results['machine']}, device {results['device']}, "
        f"torch {results['torch']}, timm {results['timm']}, {results['num_threads']} torch threads, batch "
        f"{results['batch']}, float32 weights with the amp column's autocast. Median images/s (ms/step) of "
        f"{results['steps']} timed rounds{compiled}, after {results['warmup']} warm-up rounds, every step and "
        "variant interleaved in one process; a compiled row is the same engine with `compile=True`, as `--compile` "
        "runs it."
    )
    return f"{header}\n\n{markdown_tables(results, device)}"


def default_out(device: torch.device, quick: bool) -> Path:
    """Where the figures go by default: a GPU run must not replace the CPU's, nor a smoke run either."""
    if quick:
        return Path(tempfile.gettempdir()) / "throughput_quick.json"
    return BENCHMARKS / "results" / ("throughput.json" if device.type == "cpu" else f"throughput_{device.type}.json")


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    amp_modes = [m for m in AMP_MODES if m != "auto"]
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["deit_tiny_patch16_224", TARGET_MODEL])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--batch", type=int, help="images per step (default: 16 on the CPU, 128 on a GPU)")
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (each step and variant once per round)")
    parser.add_argument("--compile-steps", type=int, default=3, help="timed rounds of the compiled steps (<= --steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (a compiled step compiles in its first)")
    parser.add_argument("--amp", nargs="+", choices=amp_modes, default=["none", "bf16"])
    parser.add_argument("--compile", nargs="+", choices=COMPILE, help="default: off on (off with --quick)")
    parser.add_argument("--compile-amp", nargs="+", choices=amp_modes, help="amp modes compiled (default: --amp)")
    parser.add_argument("--loader-epochs", type=int, default=3, help="timed epochs of the loader (of 8 batches)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: test_vit at 32 px, 3 rounds, 1 warm-up; JSON to the temp dir"
    )
    parser.add_argument(
        "--out", type=Path,
        help="JSON results file (default: benchmarks/results/throughput.json, throughput_cuda.json on CUDA); its name "
        "is the RESULTS.md section that --update-results rewrites",
    )  # fmt: skip
    parser.add_argument("--update-results", action="store_true", help="rewrite this block of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.quick and args.update_results:
        parser.error("--quick is a smoke run: its figures are not results (drop --update-results)")
    if args.quick:
        args.models, args.steps, args.warmup, args.loader_epochs = ["test_vit"], 3, 1, 1
    args.compile = args.compile or (["off"] if args.quick else list(COMPILE))
    args.compile_amp = args.compile_amp or args.amp
    args.compile_steps = min(args.compile_steps, args.steps)
    args.batch = args.batch or (16 if args.device.type == "cpu" else 128)
    if min(args.steps, args.compile_steps, args.batch, args.loader_epochs) < 1 or args.warmup < 0:
        parser.error("--steps, --compile-steps, --batch and --loader-epochs must be at least 1, --warmup at least 0")
    if "on" in args.compile and args.warmup < 1:
        parser.error("--compile on needs --warmup 1 or more: a compiled step compiles in its first call")
    return args


def variants_of(args: argparse.Namespace) -> list[Variant]:
    """The eager variant of every --amp mode (with --compile off), then the compiled one of every --compile-amp mode
    (with --compile on)."""
    eager = [Variant(amp, False) for amp in args.amp] if "off" in args.compile else []
    return eager + ([Variant(amp, True) for amp in args.compile_amp] if "on" in args.compile else [])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, batch = args.device, args.batch
    out = args.out or default_out(device, args.quick)
    variants = variants_of(args)
    print(
        f"{device_name(device)} ({device}), batch {batch}, float32 weights, variants "
        f"{', '.join(f'amp {v.amp} compile {_on_off(v.compile)}' for v in variants)}, "
        f"{torch.get_num_threads()} torch threads",
        flush=True,
    )
    loader = measure_loader(MODELS[args.models[0]].img_size, batch, 8, args.loader_epochs, device)
    print(f"loader alone: {loader['images_per_s_median']:.1f} img/s ({loader['workers']} workers)", flush=True)
    rows, info = [], {}
    for name in args.models:
        spec = MODELS[name]
        with tempfile.TemporaryDirectory() as runs:
            start = time.perf_counter()
            steps, info[name] = build_steps(spec, variants, batch, device, Path(runs))
            rounds = {key: args.compile_steps if key[0].compile else args.steps for key in steps}
            compiled = f" ({args.compile_steps} for the compiled steps)" if "on" in args.compile else ""
            print(
                f"{name}: built in {time.perf_counter() - start:.0f} s; {len(steps)} steps, {args.warmup} warm-up + "
                f"{args.steps} rounds{compiled} ...",
                flush=True,
            )
            may_fail = {(v, "search") for v in variants if v.compile}
            times, failures = time_steps(steps, rounds, args.warmup, device, may_fail)
        for row in summarize(spec, variants, times, failures, args.warmup, batch):
            rows.append(row)
            line = ", ".join(
                f"{s} {f['images_per_s_median']:.1f} img/s ({1e3 * f['s_per_step_median']:.0f} ms"
                + (f", first call {f['first_call_s']:.0f} s)" if row["compile"] else ")")
                for s, f in row["steps"].items()
            )
            failed = "".join(f"; {s} failed: {why}" for s, why in row["failed"].items())
            print(f"  amp {row['amp']}, compile {_on_off(row['compile'])}: {line}{failed}", flush=True)
    results = {
        "benchmark": "throughput",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "num_threads": torch.get_num_threads(),
        "batch": batch,
        "steps": args.steps,
        "compile_steps": args.compile_steps,
        "warmup": args.warmup,
        "loader": loader,
        "models": info,
        "rows": rows,
    }
    save_results(
        out.stem, results, markdown_tables(results, device), results_body(results, device), out, args.update_results
    )


if __name__ == "__main__":
    main()
