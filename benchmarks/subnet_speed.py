"""Subnet speed: CPU inference latency of exported subnets against the dense model, at several MACs budgets.

What it measures. For `deit_small_patch16_224` at batch 8 (by default), one architecture per budget
(0.8x, 0.6x, 0.4x of the dense MACs) is exported with `export_subnet(..., fold_bn=True)`, the inference
form, once as projected and once with `round_mlp(..., 8)` (what `spvit export --round-mlp 8` does). Each
is timed against timm's dense model in the same process. The figure of merit is

    speedup / MACs reduction = (dense ms / subnet ms) / (dense MACs / subnet MACs)

where MACs are the lookup table's (`fvcore` convention: what fvcore counts on the real modules plus the
attention matmuls); 1.0 means the saved MACs turn fully into saved time; the target is >= 0.85.

The architectures. No searched supernet of DeiT-S exists in this repository yet, so every gate logit
(attention and MLP) is drawn from N(0, 1) with a fixed seed and `project_to_budget` turns the least
confident gates off (or the most confident on) until the lookup-table MACs meet the budget: a mix of
mixers and per-block MLP widths of the kind a search produces, not a hand-picked uniform shape. Weights
are timm's random initialisation: latency does not depend on their values.

How. `torch.inference_mode()`, the default number of torch threads, random images. After warm-up
rounds, every round runs each variant once, in an order rotated every round, so machine noise falls on
all alike; the reported time is the median (and min) over the timed rounds.

Run from the repository root: `.venv/bin/python benchmarks/subnet_speed.py [--update-results]`
(about 1.5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from pathlib import Path
from typing import Any

import timm
import torch
from results_md import machine_description, save_results
from torch import nn

from lookup_tables import build_lookup_table
from spvit_search.export import export_subnet, round_mlp
from spvit_search.projection import project_to_budget
from supernets import MIXERS, VisionTransformerSupernet

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "results" / "subnet_speed.json"
TARGET = 0.85
DENSE = "dense"


def random_gate_logits_(net: VisionTransformerSupernet, seed: int) -> None:
    """Every attention and MLP gate logit drawn from N(0, 1): no choice is favoured before projection."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logits in net.gate_parameters():
            logits.copy_(torch.randn(logits.shape, generator=gen))


def build_variants(
    model: str, budgets: list[float], round_to: int, seed: int
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """timm's dense model, its dense architecture exported (the baseline of our modules: same function, same
    speed expected) and, per budget, the projected architecture's subnet with and without rounding."""
    torch.manual_seed(seed)
    dense = timm.create_model(model).eval()
    net = VisionTransformerSupernet(copy.deepcopy(dense), model).eval()
    lut = build_lookup_table(net, "fvcore")
    models: dict[str, nn.Module] = {DENSE: dense}
    info: dict[str, dict[str, Any]] = {DENSE: {"macs": lut.dense_flops(), "arch": net.dense_architecture()}}
    variants = [("dense exported", net.dense_architecture())]
    for budget in budgets:
        random_gate_logits_(net, seed)
        arch = project_to_budget(net, lut, int(budget * lut.dense_flops()))
        variants += [(f"{budget}x", arch), (f"{budget}x round{round_to}", round_mlp(arch, net, round_to))]
    for name, arch in variants:
        models[name] = export_subnet(net, arch, fold_bn=True)
        info[name] = {"macs": lut.flops(arch), "arch": arch}
    images = torch.randn(2, 3, net.img_size, net.img_size)
    with torch.inference_mode():  # the baseline is fair only if the exported dense subnet is timm's model
        torch.testing.assert_close(models["dense exported"](images), dense(images), atol=1e-4, rtol=1e-4)
    for name, module in models.items():
        info[name]["params"] = sum(p.numel() for p in module.parameters())
    return models, info


def time_variants(models: dict[str, nn.Module], images: torch.Tensor, warmup: int, rounds: int) -> dict[str, list]:
    """Milliseconds per forward of every variant, one forward each per round, the order rotated every round."""
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                models[name](images)
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summarize(info: dict[str, dict[str, Any]], times: dict[str, list[float]]) -> list[dict[str, Any]]:
    dense_ms, dense_macs = statistics.median(times[DENSE]), info[DENSE]["macs"]
    rows = []
    for name, entry in info.items():
        arch = entry["arch"]
        median = statistics.median(times[name])
        speedup, reduction = dense_ms / median, dense_macs / entry["macs"]
        rows.append(
            {
                "variant": name,
                "macs": entry["macs"],
                "params": entry["params"],
                "mixers": {m: arch.mixers.count(m) for m in MIXERS},
                "mlp_widths": [len(b.mlp_kept) for b in arch.blocks],
                "ms_median": median,
                "ms_min": min(times[name]),
                "ms_all": [round(t, 2) for t in times[name]],
                "speedup": speedup,
                "macs_reduction": reduction,
                "efficiency": speedup / reduction,
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | GMACs | x dense | params M | blocks skip/bconv1/bconv3/msa | ms median (min) | speedup "
        "| MACs reduction | speedup / MACs reduction | >= 0.85 |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|---:|:---:|",
    ]
    dense_macs = rows[0]["macs"]
    for r in rows:
        mixers = "/".join(str(r["mixers"][m]) for m in MIXERS)
        verdict = "" if r["variant"].startswith(DENSE) else ("yes" if r["efficiency"] >= TARGET else "no")
        lines.append(
            f"| {r['variant']} | {r['macs'] / 1e9:.3f} | {r['macs'] / dense_macs:.3f} | {r['params'] / 1e6:.2f} "
            f"| {mixers} | {r['ms_median']:.1f} ({r['ms_min']:.1f}) | {r['speedup']:.2f}x | {r['macs_reduction']:.2f}x "
            f"| **{r['efficiency']:.2f}** | {verdict} |"
        )
    return "\n".join(lines)


def results_body(results: dict[str, Any]) -> str:
    header = (
        f"Measured {results['date']} on {results['machine']}, torch {results['torch']}, timm {results['timm']}, "
        f"{results['num_threads']} torch threads. `{results['model']}`, batch {results['batch_size']}, "
        f"`torch.inference_mode()`; median (min) of {results['rounds']} timed forwards per variant after "
        f"{results['warmup']} warm-up rounds, all variants interleaved in one process. Subnets are exported with "
        f"BN folded; GMACs are the lookup table's (`fvcore` convention)."
    )
    return f"{header}\n\n{markdown_table(results['rows'])}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model (a supported supernet)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6, 0.4], help="MACs budgets, x dense")
    parser.add_argument("--round-mlp", type=int, default=8, help="the multiple of the rounded variants")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds (one forward per variant each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--update-results", action="store_true", help="rewrite this block of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--rounds and --batch-size must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"building {args.model}, its lookup table and {2 * len(args.budgets)} subnets ...", flush=True)
    models, info = build_variants(args.model, args.budgets, args.round_mlp, args.seed)
    images = torch.randn(args.batch_size, 3, *models[DENSE].patch_embed.img_size)
    print(f"timing {args.warmup} warm-up + {args.rounds} rounds of {len(models)} variants ...", flush=True)
    rows = summarize(info, time_variants(models, images, args.warmup, args.rounds))
    results = {
        "benchmark": "subnet_speed",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(torch.device("cpu")),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "num_threads": torch.get_num_threads(),
        "model": args.model,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "seed": args.seed,
        "target": TARGET,
        "rows": rows,
    }
    save_results("subnet_speed", results, markdown_table(rows), results_body(results), args.out, args.update_results)


if __name__ == "__main__":
    main()
