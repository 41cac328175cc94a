"""Hitting a latency budget: do subnets searched for 0.6x and 0.4x of the dense latency run at that latency?

For `--model` (deit_small_patch16_224 at 224 by default) it measures a latency table on the device (the CPU by
default: batch 8, 2 threads), then runs the gradient search (`spvit search`, one epoch on a small image folder the
script writes: the accuracy is not what is measured here, and the final projection fills the gates up to the
budget) at each budget twice: in predicted milliseconds (`--metric latency`) and in MACs at the same fraction. It
exports each search's architecture and measures, end to end, the subnet's latency against the dense model's, in the
same run. (An Optuna study's best trial lies anywhere under the budget, so it does not show whether one is hit.)

Run from the repository root on a quiet machine: `.venv/bin/python benchmarks/latency_budget.py [--update-results]`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from results_md import save_results, study_record
from safetensors.torch import save_file

from lookup_tables import LatencyContext, Timer, build_latency_table, network_calls
from spvit_search.export import export_subnet
from spvit_search.search import SearchConfig, run_search
from supernets import Architecture, build_supernet

BENCHMARKS = Path(__file__).resolve().parent


def write_image_folder(folder: Path, count: int, size: int) -> Path:
    """`count` random RGB images in 10 class folders: data for a search whose accuracy does not matter."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"class{i % 10}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument("--images", type=int, default=32, help="images of the search's image folder")
    parser.add_argument("--mlp-points", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="timings of each part while building the table")
    parser.add_argument("--check-repeats", type=int, default=60, help="timings of each subnet in the final check")
    parser.add_argument("--out", type=Path, default=Path("runs/latency_budget"))
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results" / "latency_budget.json")
    parser.add_argument("--update-results", action="store_true", help="refresh the section in RESULTS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    started = time.perf_counter()
    torch.manual_seed(0)
    net = build_supernet(args.model, num_classes=10).eval()  # digits' classes; random weights time the same
    context = LatencyContext.of(device, args.batch, "fp32", args.threads)
    timer = Timer(device, repeats=args.repeats)
    lut = build_latency_table(net, lambda arch: export_subnet(net, arch), context, timer, mlp_points=args.mlp_points)
    args.out.mkdir(parents=True, exist_ok=True)
    lut.save(args.out / "lut.csv")
    weights = args.out / "dense.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(args.model, num_classes=10).state_dict(), str(weights))
    images = torch.zeros(args.batch, 3, net.img_size, net.img_size)
    folder = write_image_folder(args.out / "images", args.images, net.img_size)

    searched = {}
    for budget in args.budgets:
        for metric in ("latency", "macs"):
            out = args.out / f"{metric}_{budget}x"
            shutil.rmtree(out, ignore_errors=True)  # this benchmark's own run of an earlier invocation
            summary = run_search(
                SearchConfig(
                    model=args.model, checkpoint=str(weights), num_classes=10, data=str(folder), out=str(out),
                    target=f"{budget}x", metric=metric, lut=str(args.out / "lut.csv"), epochs=1, batch_size=8,
                    num_workers=0, progress=False, device="cpu",
                )
            )  # fmt: skip
            searched[metric, budget] = Architecture.load(out / "arch.json"), summary
    # Every subnet and the dense model timed interleaved, in the same rounds.
    archs = {"dense": net.dense_architecture()} | {f"{m} {b}x": arch for (m, b), (arch, _) in searched.items()}
    check = Timer(device, repeats=args.check_repeats)
    timings = check(network_calls(archs, lambda arch: export_subnet(net, arch), images, context))
    measured = {name: ms for (_, name, _), (ms, _) in timings.items()}
    dense_ms = measured["dense"]
    rows = []
    for (metric, budget), (arch, summary) in searched.items():
        ms = measured[f"{metric} {budget}x"]
        rows.append({
            "budget": budget, "metric": metric, "measured_ms": ms, "measured_x_dense": ms / dense_ms,
            "predicted_ms": lut.latency(arch), "macs_x_dense": lut.flops(arch) / lut.dense_flops(),
            "miss": ms / dense_ms / budget - 1, "steps": summary["steps"],
            "measured_in_search_ms": summary.get("measured_latency_ms"),
        })  # fmt: skip
        print(f"{metric} {budget}x: measured {ms:.2f} ms = {ms / dense_ms:.3f}x of dense", flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = ["| budget | counted in | measured latency ÷ dense | miss | predicted ms | measured ms | measured in the "
             "search, ms | MACs ÷ dense |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        in_search = "—" if r["measured_in_search_ms"] is None else f"{r['measured_in_search_ms']:.2f}"
        lines.append(f"| {r['budget']}x | {r['metric']} | {r['measured_x_dense']:.3f} | {r['miss']:+.1%} | "
                     f"{r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {in_search} | "
                     f"{r['macs_x_dense']:.3f} |")  # fmt: skip
    table = "\n".join(lines)
    body = (
        f"Measured {study_record('latency_budget', args, minutes)['date']} on {context.describe()}; {args.model} at "
        f"{net.img_size}, dense {dense_ms:.2f} ms per batch measured; one search epoch on {args.images} images; "
        f"the final check times each subnet {args.check_repeats} times, interleaved with dense; "
        f"{minutes:.1f} minutes in all.\n\n{table}"
    )
    results = {**study_record("latency_budget", args, minutes), "dense_ms": dense_ms, "rows": rows}
    save_results("latency_budget", results, table, body, args.results, args.update_results)


if __name__ == "__main__":
    main()
