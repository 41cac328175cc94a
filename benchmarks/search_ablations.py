"""Search ablations: why the search's subnets fine-tune no better than magnitude pruning, one factor at a time.

Two parts, both on the accuracy study's setting (`accuracy_study.py`: test_vit, patch 4, soft-KD fine-tuning):

- **Variants.** Each variant is the study's `spvit` and `spvit_dense_init` candidates with one search setting
  changed (`--search-set`), at one budget and the given seeds; a variant whose `OUT/NAME.json` exists is read back,
  not rerun (delete it to rerun). Every variant reuses the dense model of `OUT/default/dense`.
- **Gate ranking.** For the default variant's searched supernet, per block: the kept MLP units, the Spearman
  correlation of the gate logits with the magnitude importance ‖fc1 row‖·‖fc2 column‖ and with a first-order
  (Taylor) importance, the mean squared cross-entropy gradient of each unit's gate at the dense start, and the val
  top-1 before any fine-tuning of the dense weights with the searched per-block widths filled by each ranking
  (logit, magnitude, Taylor), against the uniform magnitude shape at the same budget.

Run from the repository root: `.venv/bin/python benchmarks/search_ablations.py [--update-results]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import accuracy_study
import pandas as pd
import torch
import torch.nn.functional as F
from accuracy_study import one_shot_metrics, uniform_architecture
from results_md import save_results, study_record

from lookup_tables import build_lookup_table
from spvit_search.data import build_dataset, build_loader
from spvit_search.demo import DENSE_WEIGHTS, DemoConfig
from spvit_search.discrete_spaces import unit_magnitude, unit_ranking
from spvit_search.export import load_search_supernet
from supernets import Architecture, BlockChoice, build_supernet

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "results" / "search_ablations.json"
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "kd": ["distillation=soft"],
    "patience": ["patience=100"],
    "maginit": ["gate_init_from=magnitude"],
    "gatelr01": ["gate_lr=0.01"],
    "temp05": ["gate_temperature=0.5"],
    "shared05": ["gate_optimizer=shared_adam"],
    "shared001": ["gate_optimizer=shared_adam", "gate_lr=0.01"],
}
"""Variant name: the `--search-set` settings it changes from the study's search."""
TAYLOR_BATCHES = 30


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    out = args.out / name
    results = args.out / f"{name}.json"
    if not results.is_file():
        if name != "default" and not (out / "dense").is_dir():
            shutil.copytree(args.out / "default" / "dense", out / "dense")
        argv = [
            "--data", args.data, "--img-size",
            str(args.img_size), "--dense-epochs", str(args.dense_epochs), "--budgets", str(args.budget), "--seeds",
            *map(str, args.seeds), "--methods", "spvit", "spvit_dense_init", "--out", str(out), "--results",
            str(results), "--search-epochs", str(args.search_epochs), "--finetune-epochs", str(args.finetune_epochs),
        ]  # fmt: skip
        for setting in VARIANTS[name]:
            argv += ["--search-set", setting]
        accuracy_study.main(argv)
    return json.loads(results.read_text())


def variant_rows(name: str, study: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for method in ("spvit", "spvit_dense_init"):
        runs = [r for r in study["runs"] if r["method"] == method]
        accs = [r["acc1"] for r in runs]
        rows.append(
            {
                "variant": name, "settings": " ".join(VARIANTS[name]) or "(the study's)", "method": method,
                "seeds": len(runs), "acc1_mean": statistics.mean(accs),
                "acc1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "acc1_before": statistics.mean(r["acc1_before_finetune"] for r in runs),
                "mixers": " ".join(runs[0]["mixers"]), "mlp_widths": " ".join(map(str, runs[0]["mlp_widths"])),
            }
        )  # fmt: skip
    return rows


def gate_ranking(args: argparse.Namespace) -> dict[str, Any]:
    """The per-block table of the default variant's first seed (see the module docstring)."""
    study_out = args.out / "default"
    searched = load_search_supernet(study_out / "search" / f"{args.budget}x_s{args.seeds[0]}" / "supernet.safetensors")
    demo = DemoConfig()  # the study's model, as accuracy_study.py builds it
    dense = build_supernet(
        demo.model, checkpoint_path=study_out / "dense" / DENSE_WEIGHTS, img_size=args.img_size,
        num_classes=searched.num_classes, **demo.model_kwargs,
    )  # fmt: skip
    lut = build_lookup_table(dense)
    val_loader = build_loader(build_dataset(args.data, "val", args.img_size, augment=False), 256, train=False)
    taylor = taylor_importance(dense, args)
    magnitude = [unit_magnitude(b.mlp) for b in dense.blocks]
    logits = [b.mlp.gates.logits.detach() for b in searched.blocks]
    widths = [int((x > 0).sum()) for x in logits]
    mixers = searched.architecture().mixers

    def filled(scores: list[torch.Tensor]) -> Architecture:
        blocks = [
            BlockChoice(m, tuple(sorted(s.argsort(descending=True)[:k].tolist())))
            for m, s, k in zip(mixers, scores, widths, strict=True)
        ]
        return Architecture(dense.name, dense.img_size, dense.num_classes, tuple(blocks))

    target = int(args.budget * lut.dense_flops())
    uniform = uniform_architecture(dense, lut, target, [unit_ranking(b.mlp) for b in dense.blocks])
    one_shot = {
        "logit": one_shot_metrics(dense, filled(logits), val_loader)["acc1"],
        "magnitude": one_shot_metrics(dense, filled(magnitude), val_loader)["acc1"],
        "taylor": one_shot_metrics(dense, filled(taylor), val_loader)["acc1"],
        "uniform magnitude": one_shot_metrics(dense, uniform, val_loader)["acc1"] if uniform else float("nan"),
    }
    rows = []
    for i, (logit, mag, tay) in enumerate(zip(logits, magnitude, taylor, strict=True)):
        frame = pd.DataFrame({"logit": logit.numpy(), "magnitude": mag.numpy(), "taylor": tay.numpy()})
        corr = frame.corr(method="spearman")
        rows.append(
            {
                "block": i, "mixer": mixers[i], "kept": widths[i], "of": len(logit),
                "spearman_magnitude": corr.loc["logit", "magnitude"], "spearman_taylor": corr.loc["logit", "taylor"],
                "taylor_mean": float(tay.mean()),
            }
        )  # fmt: skip
    return {"one_shot": one_shot, "blocks": rows}


def taylor_importance(net: torch.nn.Module, args: argparse.Namespace) -> list[torch.Tensor]:
    """Per block, each MLP unit's mean squared cross-entropy gradient on its gate over TAYLOR_BATCHES train batches
    at the dense start: the first-order estimate of the loss change from cutting it (Molchanov et al. 2019)."""
    net.set_gate_generator(torch.Generator().manual_seed(0))
    loader = build_loader(build_dataset(args.data, "train", args.img_size), 64, train=True, seed=0)
    sums = [torch.zeros_like(b.mlp.gates.logits) for b in net.blocks]
    net.train()
    for i, (images, targets) in enumerate(loader):
        if i == TAYLOR_BATCHES:
            break
        net.zero_grad()
        F.cross_entropy(net(images), targets).backward()
        for total, block in zip(sums, net.blocks, strict=True):
            total += block.mlp.gates.logits.grad.pow(2)
    net.zero_grad()
    net.eval()
    return [total / TAYLOR_BATCHES for total in sums]


def markdown(rows: list[dict[str, Any]], ranking: dict[str, Any]) -> str:
    lines = [
        "| variant | search settings | fine-tuned from | val top-1 mean ± std | not fine-tuned | mixers | MLP widths |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        start = "search weights" if r["method"] == "spvit" else "dense weights"
        lines.append(
            f"| {r['variant']} | `{r['settings']}` | {start} | {r['acc1_mean']:.2f} ± {r['acc1_std']:.2f} | "
            f"{r['acc1_before']:.2f} | {r['mixers']} | {r['mlp_widths']} |"
        )
    lines += [
        "",
        "| block | mixer | kept | Spearman(logit, magnitude) | Spearman(logit, Taylor) | mean Taylor importance |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for b in ranking["blocks"]:
        lines.append(
            f"| {b['block']} | {b['mixer']} | {b['kept']}/{b['of']} | {b['spearman_magnitude']:.2f} | "
            f"{b['spearman_taylor']:.2f} | {b['taylor_mean']:.2e} |"
        )
    shots = ", ".join(f"{k} {v:.2f}" for k, v in ranking["one_shot"].items())
    lines += ["", f"Val top-1 of the dense weights, no fine-tuning, searched widths filled by each ranking: {shots}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion_mnist:300:100")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/search_ablations"))
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--update-results", action="store_true", help="refresh the section in RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    rows = [row for name in args.variants for row in variant_rows(name, run_variant(name, args))]
    ranking = gate_ranking(args)
    minutes = (time.perf_counter() - started) / 60
    table = markdown(rows, ranking)
    results = {
        **study_record("search_ablations", args, minutes),
        "variants": rows,
        "gate_ranking": ranking,
    }
    body = (
        f"Measured {results['date']} on {results['machine']}, torch {torch.__version__}, data `{args.data}`, "
        f"{args.img_size} px, budget {args.budget}x, seeds {' '.join(map(str, args.seeds))}; search "
        f"{args.search_epochs} epochs, fine-tune {args.finetune_epochs} epochs from the search weights or "
        f"{args.search_epochs + args.finetune_epochs} from the dense weights, soft KD.\n\n{table}"
    )
    save_results("search_ablations", results, table, body, args.results, args.update_results)


if __name__ == "__main__":
    main()
