"""Search-mode overhead: time per training step and peak memory of a supernet against its dense timm model.

What it measures. The search trains the supernet with gates sampled (`net.train()`, no fixed
architecture): each unified MSA computes msa, bconv1 and bconv3 (the sampled one with autograd), and
every MLP hidden unit is gated. One training step is cross-entropy on the logits, backward and
an AdamW step over all parameters (gate logits included). The baseline is the dense timm model the
supernet was converted from (same weights, same batch, same loss, same optimizer). For each model the
script reports the median and min time per step, the peak memory of a step, and supernet/dense ratios;
the target is a time ratio of at most 1.25.

How. Every measurement runs in a fresh subprocess (`--worker`), so one model's allocations, caches and
allocator state cannot hide or inflate the other's:

- timing: one process per model builds both networks, checks that they compute the same logits, runs
  warm-up steps and then alternates supernet and dense steps (swapping which goes first every round),
  so that machine noise falls on both alike; `torch.get_num_threads()` is left at its default and
  recorded;
- memory: one process per (model, variant) measures the peak increase of a few steps over the
  process's baseline after imports, model build and optimizer creation (CPU: resident set size from
  /proc; CUDA: `torch.cuda.max_memory_allocated`).

Run from the repository root: `.venv/bin/python benchmarks/search_overhead.py [--update-results]`.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from results_md import machine_description, save_results
from torch import nn

from supernets import VisionTransformerSupernet

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "results" / "search_overhead.json"
TARGET_TIME_RATIO = 1.25
VARIANTS = ("supernet", "dense")
MEMORY_STEPS = 3  # step 1 allocates AdamW's state; later steps show the steady-state peak on top of it
MIB = 2**20


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: timm name and kwargs, the batch and the default number of timed steps."""

    name: str
    batch_size: int
    steps: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def img_size(self) -> int:
        return self.kwargs.get("img_size", 224)

    @property
    def num_classes(self) -> int:
        return self.kwargs.get("num_classes", 1000)


MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("deit_tiny_patch16_224", batch_size=8, steps=10),
        # Batch 64 is the tiny model's realistic search batch (CIFAR-sized images).
        ModelSpec("test_vit", batch_size=64, steps=30, kwargs={"img_size": 32, "patch_size": 4, "num_classes": 10}),
    )
}


# -- one training step -------------------------------------------------------------------------------


def build_models(spec: ModelSpec, variants: tuple[str, ...], device: torch.device) -> dict[str, nn.Module]:
    """The dense timm model and/or its supernet, converted from the very same weights."""
    torch.manual_seed(0)
    dense = timm.create_model(spec.name, **spec.kwargs)
    models: dict[str, nn.Module] = {}
    if "supernet" in variants:
        models["supernet"] = VisionTransformerSupernet(copy.deepcopy(dense), spec.name, model_kwargs=spec.kwargs)
    if "dense" in variants:
        models["dense"] = dense
    return {variant: models[variant].to(device) for variant in variants}


def make_batch(spec: ModelSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size, generator=gen)
    labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=gen)
    return images.to(device), labels.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a step's time and memory belong to that step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> Callable[[], None]:
    """One search-style training step: sampled gates (train mode), cross-entropy, backward, AdamW on everything."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, labels = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        synchronize(device)

    return step


def check_same_function(models: dict[str, nn.Module], images: torch.Tensor) -> None:
    """The comparison is fair only if the supernet's dense architecture is the timm model (gates start on)."""
    with torch.no_grad():
        logits = {variant: model.eval()(images) for variant, model in models.items()}
    torch.testing.assert_close(logits["supernet"], logits["dense"], atol=1e-4, rtol=1e-4)


# -- workers (each in a fresh process) ---------------------------------------------------------------


def time_worker(spec: ModelSpec, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Per-step wall times of both variants, alternating which runs first in each round."""
    models = build_models(spec, VARIANTS, device)
    batch = make_batch(spec, device)
    check_same_function(models, batch[0])
    step_fns = {variant: make_step(model, batch, device) for variant, model in models.items()}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for i in range(warmup + steps):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            start = time.perf_counter()
            step_fns[variant]()
            if i >= warmup:
                times[variant].append((time.perf_counter() - start) * 1e3)
    params = {variant: sum(p.numel() for p in model.parameters()) for variant, model in models.items()}
    return {"times_ms": times, "params": params, "num_threads": torch.get_num_threads()}


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_worker(spec: ModelSpec, variant: str, device: torch.device) -> dict[str, float]:
    """Peak memory of a few training steps above the baseline after imports, build and optimizer creation.

    CPU: resident set size, because it counts everything a step really touches (activations, gradients,
    AdamW state, autograd buffers, allocator slack), where profiler-based accounting sees tensors only.
    Freed memory is returned to the OS (malloc_trim) before the baseline, and the kernel's high-water
    mark VmHWM is reset (clear_refs 5), so build-time temporaries such as the deep copy that becomes the
    supernet count in neither variant. Both variants are measured the same way, in their own process.
    CUDA: `max_memory_allocated` above the allocated bytes at the baseline.
    """
    model = build_models(spec, (variant,), device)[variant]
    step = make_step(model, make_batch(spec, device), device)
    gc.collect()
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(MEMORY_STEPS):
            step()
        peak = torch.cuda.max_memory_allocated(device)
        return {"baseline_mb": baseline / MIB, "peak_increase_mb": (peak - baseline) / MIB}
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("CPU memory is measured from /proc (Linux only); use --device cuda elsewhere")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline_kib = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(MEMORY_STEPS):
        step()
    return {"baseline_mb": baseline_kib / 1024, "peak_increase_mb": (_proc_status_kib("VmHWM") - baseline_kib) / 1024}


def run_worker(kind: str, model: str, device: str, extra: list[str]) -> dict[str, Any]:
    """Run one worker in a fresh Python process and return the JSON it prints last."""
    cmd = [sys.executable, __file__, "--worker", kind, "--models", model, "--device", device, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd[2:])} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the report --------------------------------------------------------------------------------------


def summarize(spec: ModelSpec, warmup: int, steps: int, timing: dict[str, Any], memory: dict[str, dict]) -> dict:
    """Median/min times, peak memory increases and the supernet/dense ratios of one model."""
    times = {
        v: {"median": statistics.median(t), "min": min(t), "all": [round(x, 3) for x in t]}
        for v, t in timing["times_ms"].items()
    }
    return {
        "model": spec.name,
        "kwargs": spec.kwargs,
        "batch_size": spec.batch_size,
        "warmup": warmup,
        "steps": steps,
        "params": timing["params"],
        "time_ms": times,
        "time_ratio_median": times["supernet"]["median"] / times["dense"]["median"],
        "time_ratio_min": times["supernet"]["min"] / times["dense"]["min"],
        "memory_mb": memory,
        "memory_ratio": memory["supernet"]["peak_increase_mb"] / memory["dense"]["peak_increase_mb"],
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | dense ms/step median (min) | supernet ms/step median (min) | time ratio median (min) "
        "| dense peak MB | supernet peak MB | memory ratio | time <= 1.25x |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        t, m = r["time_ms"], r["memory_mb"]
        lines.append(
            f"| {r['model']} | {r['batch_size']} "
            f"| {t['dense']['median']:.1f} ({t['dense']['min']:.1f}) "
            f"| {t['supernet']['median']:.1f} ({t['supernet']['min']:.1f}) "
            f"| **{r['time_ratio_median']:.2f}x** ({r['time_ratio_min']:.2f}x) "
            f"| {m['dense']['peak_increase_mb']:.0f} | {m['supernet']['peak_increase_mb']:.0f} "
            f"| **{r['memory_ratio']:.2f}x** | {'yes' if r['time_ratio_median'] <= TARGET_TIME_RATIO else 'no'} |"
        )
    return "\n".join(lines)


def results_body(results: dict[str, Any]) -> str:
    """The part of the RESULTS.md section that a fresh run replaces: provenance and the table."""
    header = (
        f"Measured {results['date']} on {results['machine']}, device {results['device']}, torch {results['torch']}, "
        f"timm {results['timm']}, {results['num_threads']} torch threads. Time: median (min) of the timed steps "
        f"after {results['models'][0]['warmup']} warm-up steps, supernet and dense alternating in one process. "
        f"Peak MB: peak memory increase of {MEMORY_STEPS} training steps over the process's baseline after build, "
        "one fresh process per model and variant."
    )
    return f"{header}\n\n{markdown_table(results['models'])}"


# -- command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="models to run")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: 10 deit_tiny, 30 test_vit)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--update-results", action="store_true", help="rewrite this block of benchmarks/RESULTS.md")
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.worker and len(args.models) != 1:
        parser.error("a worker measures exactly one model")
    return args


def worker_main(args: argparse.Namespace) -> None:
    spec, device = MODELS[args.models[0]], torch.device(args.device)
    if args.worker == "time":
        result = time_worker(spec, device, args.warmup, args.steps or spec.steps)
    else:
        result = memory_worker(spec, args.variant, device)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    device = torch.device(args.device)
    rows = []
    num_threads = None
    for name in args.models:
        spec = MODELS[name]
        steps = args.steps or spec.steps
        print(f"{name}: timing {args.warmup} warm-up + {steps} steps per variant ...", flush=True)
        timing = run_worker("time", name, args.device, ["--warmup", str(args.warmup), "--steps", str(steps)])
        num_threads = timing["num_threads"]
        print(f"{name}: peak memory (torch threads: {num_threads}) ...", flush=True)
        memory = {v: run_worker("memory", name, args.device, ["--variant", v]) for v in VARIANTS}
        rows.append(summarize(spec, args.warmup, steps, timing, memory))
    results = {
        "benchmark": "search_overhead",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "device": args.device,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "num_threads": num_threads,
        "target_time_ratio": TARGET_TIME_RATIO,
        "models": rows,
    }
    save_results("search_overhead", results, markdown_table(rows), results_body(results), args.out, args.update_results)


if __name__ == "__main__":
    main()
