"""Latency lookup table: how well does it predict the exported subnets' measured latency?

It builds a latency table (`spvit lut --latency`) for `--model` (deit_small_patch16_224 by default) at 224 on the
device (the CPU by default: batch 8, 2 threads), then, in the same run, measures end to end the exported subnets
of `--archs` architectures the table did not see while fitting its correction: random ones (random mixers and
kept units) and searched-like ones (every block a share of MLP units, msa or a cheaper mixer). Reported per
architecture: measured and predicted milliseconds per batch and the relative error; over them the median absolute
and the worst error.

Run from the repository root: `.venv/bin/python benchmarks/latency_lut.py [--update-results]` on a quiet machine
(timings of a loaded machine mean nothing).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from results_md import save_results, study_record

from lookup_tables import LatencyContext, Timer, build_latency_table, network_calls
from spvit_search.export import export_subnet
from supernets import MIXERS, BlockChoice, build_supernet

BENCHMARKS = Path(__file__).resolve().parent


def unseen_architectures(net, count: int, seed: int) -> dict[str, object]:
    """Half random (every mixer and width at random), half shaped like a search's result (a share of every MLP
    kept, the first blocks' mixers cheaper)."""
    rng = random.Random(seed)
    archs = {}
    for k in range(count):
        if k % 2 == 0:
            blocks = [BlockChoice(rng.choice(MIXERS), tuple(sorted(rng.sample(range(h), rng.randint(0, h)))))
                      for h in net.mlp_hidden]  # fmt: skip
            archs[f"random{k // 2}"] = net.architecture_of(blocks)
        else:
            share, cheap = rng.uniform(0.3, 0.9), rng.randint(0, net.depth // 2)
            mixers = [rng.choice(("skip", "bconv1", "bconv3")) if i < cheap else "msa" for i in range(net.depth)]
            blocks = [
                BlockChoice(m, tuple(range(round(share * h)))) for m, h in zip(mixers, net.mlp_hidden, strict=True)
            ]
            archs[f"searched{k // 2}"] = net.architecture_of(blocks)
    return archs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--mlp-points", type=int, default=32)
    parser.add_argument("--archs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="of the unseen architectures (the checks draw seed 0)")
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results" / "latency_lut.json")
    parser.add_argument("--update-results", action="store_true", help="refresh the section in RESULTS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    net = build_supernet(args.model).to(device).eval()
    context = LatencyContext.of(device, args.batch, args.dtype, args.threads)
    timer = Timer(device, repeats=args.repeats)
    lut = build_latency_table(net, lambda arch: export_subnet(net, arch), context, timer, mlp_points=args.mlp_points)
    built = time.perf_counter() - started
    images = torch.zeros(args.batch, 3, net.img_size, net.img_size, device=device)
    archs = unseen_architectures(net, args.archs, args.seed)
    # Timed interleaved, as the table's own checks are, with the dense network again: how much faster or slower
    # the machine runs now than when the table was fitted (its drift) shows in the dense's two measurements.
    calls = network_calls(archs | {"dense": net.dense_architecture()}, lambda arch: export_subnet(net, arch), images,
                          context)  # fmt: skip
    timings = {key[1]: (key[2], *timing) for key, timing in timer(calls).items()}
    dense_then = next(c["measured_ms"] for c in lut.meta["latency"]["checks"] if c["arch"] == "dense")
    drift = timings.pop("dense")[1] / dense_then
    rows = []
    for name, (arch, measured, spread) in timings.items():
        predicted = lut.latency(arch, context)
        rows.append({"arch": name, "macs_x_dense": lut.flops(arch) / lut.dense_flops(), "measured_ms": measured,
                     "spread_ms": spread, "predicted_ms": predicted, "error": predicted / measured - 1,
                     "error_at_drift": predicted * drift / measured - 1})  # fmt: skip
        print(
            f"{name}: measured {measured:.2f} ms, predicted {predicted:.2f} ms ({rows[-1]['error']:+.1%})", flush=True
        )
    errors = [abs(r["error"]) for r in rows]
    at_drift = [abs(r["error_at_drift"]) for r in rows]
    summary = {
        "median_abs_error": statistics.median(errors), "worst_abs_error": max(errors), "drift": drift,
        "median_abs_error_at_drift": statistics.median(at_drift), "worst_abs_error_at_drift": max(at_drift),
    }  # fmt: skip
    minutes = (time.perf_counter() - started) / 60
    lines = ["| architecture | MACs (x dense) | measured ms | predicted ms | error | error at the drift |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['arch']} | {r['macs_x_dense']:.3f} | {r['measured_ms']:.2f} ± {r['spread_ms']:.2f} | "
              f"{r['predicted_ms']:.2f} | {r['error']:+.1%} | {r['error_at_drift']:+.1%} |" for r in rows]  # fmt: skip
    table = "\n".join(lines)
    header = lut.meta["latency"]
    body = (
        f"Measured {study_record('latency_lut', args, minutes)['date']} on {context.describe()}; {args.model} at "
        f"{net.img_size}, {args.mlp_points} MLP widths per block, {args.repeats} timings per median. The table took "
        f"{built / 60:.1f} minutes; its correction is {header['scale']:.3f} x the sum of the parts + "
        f"{header['offset']:.3f} ms. On {len(rows)} architectures it did not see: median absolute error "
        f"{summary['median_abs_error']:.1%}, worst {summary['worst_abs_error']:.1%}. The dense network ran "
        f"{drift:.3f}x as long as when the table was fitted; scaled by that drift, the prediction's median error "
        f"is {summary['median_abs_error_at_drift']:.1%}, its worst {summary['worst_abs_error_at_drift']:.1%}."
        f"\n\n{table}"
    )
    results = {**study_record("latency_lut", args, minutes), "context": context.__dict__, "latency_header": header,
               "rows": rows, **summary}  # fmt: skip
    save_results("latency_lut", results, table, body, args.results, args.update_results)


if __name__ == "__main__":
    main()
