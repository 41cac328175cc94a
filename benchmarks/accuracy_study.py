"""Accuracy study: does the SPViT search beat simple baselines at the same MACs?

What it compares. A small DeiT-like model (timm's `test_vit`: dim 64, depth 6, 2 heads; `--img-size` images in
4×4 patches: 64 tokens at 32 px, 49 at 28) is trained inside the script on the data (digits by default;
`fashion_mnist:TRAIN:VAL` for a harder one). At each budget (`fvcore` MACs relative to dense) the candidates:

- `dense`: the dense model itself (no budget);
- `spvit`: `spvit search` at the budget (gates and weights trained together), exported, fine-tuned from the
  search's weights;
- `spvit_dense_init`: the same searched architecture fine-tuned from the dense weights (`--init dense`, the
  paper's choice);
- `magnitude`: every mixer msa, every block keeps the same share of MLP hidden units, the largest by
  ‖fc1 row‖·‖fc2 column‖; the share is the largest that fits the budget;
- `uniform`: the same shape, but every block keeps its *first* units (a width multiplier, no criterion);
- `random`: every gate logit drawn from N(0, 1), then projected onto the budget (random mixers and
  per-block widths, as close under the budget as the greedy projection gets);
- `attention_drop`: skip the attention layers whose removal alone costs the least val loss, then magnitude
  MLP pruning to the budget; of the feasible numbers of skipped layers, the one with the lowest one-shot loss;
- `optuna`: `spvit search --strategy optuna` (TPE, scored with the dense weights shared, BN recalibrated);
- `spvit_affine`: `spvit` with RIFormer's affine skip (`--skip-mixer affine`) in the search and the subnet;
- `spvit_affine_imitation`: the same searched subnet, fine-tuned with module imitation (`--imitation`) on top
  of the soft KD. (`spvit` itself is the identity skip with soft KD.)

Every candidate is fine-tuned the same way (`spvit finetune`: soft KD from the dense model, α 0.5, τ 1) for the
same number of weight-training epochs in all: `spvit` gets `--finetune-epochs` after its search's
`--search-epochs`, every other candidate `--search-epochs + --finetune-epochs`, from the dense weights.
Reported over the seeds: mean ± std of the final val top-1 (the last epoch, no selection on val), the top-1
before fine-tuning, and the real MACs of each candidate (lookup table; the same as fvcore's count of the
exported module). `--search-set KEY=JSON` changes a search setting (`search_ablations.py` uses it).

Run from the repository root: `.venv/bin/python benchmarks/accuracy_study.py [--data SPEC] [--update-results]`
(about 20 minutes per budget and seed on 2 CPU cores with `fashion_mnist:300:100` at 28 px).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from results_md import save_results, study_record
from subnet_speed import random_gate_logits_
from torch.utils.data import DataLoader

from finetune.classification import evaluate_classifier
from lookup_tables import LookupTable, build_lookup_table
from reports.plots import mean_accuracy_vs_macs, png_bytes
from spvit_search.data import build_dataset, build_loader, num_classes_of
from spvit_search.demo import DemoConfig, train_dense_model
from spvit_search.discrete_spaces import unit_ranking
from spvit_search.export import Lineage, export_subnet, load_search_supernet, save_subnet
from spvit_search.finetuning import FinetuneConfig, run_finetune
from spvit_search.optuna_search import OptunaConfig, run_optuna
from spvit_search.projection import project_to_budget
from spvit_search.search import SearchConfig, run_search
from supernets import Architecture, BlockChoice, VisionTransformerSupernet, build_supernet
from supernets.io import atomic_write_bytes

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "results" / "accuracy_study.json"
METHODS = (
    "dense", "spvit", "spvit_dense_init", "magnitude", "uniform", "random", "attention_drop", "optuna", "spvit_affine",
    "spvit_affine_imitation",
)  # fmt: skip


def uniform_architecture(
    net: VisionTransformerSupernet,
    lut: LookupTable,
    target: int,
    rankings: list[list[int]],
    mixers: list[str] | None = None,
) -> Architecture | None:
    """`mixers` (default: all msa); every block keeps its first k units of `rankings`, the largest k that fits
    `target`; None when even k = 0 does not fit."""
    mixers = mixers or ["msa"] * len(rankings)

    def arch(k: int) -> Architecture:
        blocks = [BlockChoice(m, tuple(sorted(r[:k]))) for m, r in zip(mixers, rankings, strict=True)]
        return Architecture(net.name, net.img_size, net.num_classes, tuple(blocks))

    low, high = 0, min(len(r) for r in rankings)
    if lut.flops(arch(0)) > target:
        return None
    while low < high:  # the largest k with flops(arch(k)) <= target
        middle = (low + high + 1) // 2
        low, high = (middle, high) if lut.flops(arch(middle)) <= target else (low, middle - 1)
    return arch(low)


def one_shot_metrics(net: VisionTransformerSupernet, arch: Architecture, val_loader: DataLoader) -> dict[str, float]:
    """Val top-1 and loss of `net`'s weights with `arch` fixed, before any fine-tuning."""
    net.eval()
    net.fix_architecture(arch)
    try:
        with torch.no_grad():
            return evaluate_classifier(net, val_loader)
    finally:
        net.release_architecture()


def attention_drop_architecture(
    net: VisionTransformerSupernet, lut: LookupTable, target: int, rankings: list[list[int]], val_loader: DataLoader
) -> Architecture | None:
    """Skip the attention layers whose removal alone costs the least val loss, then cut every MLP by magnitude to
    the budget. How many to skip: of the feasible counts, the one whose pruned model has the lowest val loss
    before fine-tuning (one-shot)."""
    dense = net.dense_architecture()
    alone = []
    for i in range(len(dense.blocks)):
        blocks = list(dense.blocks)
        blocks[i] = BlockChoice("skip", blocks[i].mlp_kept)
        alone.append(one_shot_metrics(net, dataclasses.replace(dense, blocks=tuple(blocks)), val_loader)["loss"])
    order = sorted(range(len(alone)), key=alone.__getitem__)
    best: tuple[float, Architecture] | None = None
    for count in range(len(order) + 1):
        mixers = ["skip" if i in order[:count] else "msa" for i in range(len(order))]
        arch = uniform_architecture(net, lut, target, rankings, mixers)
        if arch is not None:
            loss = one_shot_metrics(net, arch, val_loader)["loss"]
            best = min(best or (loss, arch), (loss, arch), key=lambda pair: pair[0])
    return None if best is None else best[1]


def finetune(
    subnet_dir: Path, out: Path, data: str, epochs: int, seed: int, init: str = "subnet", imitation: bool = False
) -> dict[str, Any]:
    return run_finetune(
        FinetuneConfig(subnet=str(subnet_dir), data=data, out=str(out), distillation="soft", epochs=epochs, seed=seed,
                       init=init, imitation=imitation, num_workers=0, progress=False)
    )  # fmt: skip


def search_config(args: argparse.Namespace, demo: DemoConfig, dense_weights: Path, budget: float, seed: int,
                  out: Path, skip_mixer: str = "identity") -> SearchConfig:  # fmt: skip
    """The study's search at `budget`, with `--search-set` applied over the demo's settings."""
    settings = {
        "skip_mixer": skip_mixer,
        "model": demo.model, "data": args.data, "out": str(out), "target": f"{budget}x",
        "checkpoint": str(dense_weights), "img_size": demo.img_size, "model_kwargs": demo.model_kwargs,
        "epochs": args.search_epochs, "lr": demo.search_lr, "gate_lr": demo.gate_lr, "seed": seed, "num_workers": 0,
        "progress": False,
    }  # fmt: skip
    return SearchConfig(**(settings | args.search_set))


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    for stale in ("search", "subnets", "finetune", "optuna"):  # every candidate is rebuilt; dense/ is the cache
        shutil.rmtree(out / stale, ignore_errors=True)
    demo = DemoConfig(
        out=str(out), data=args.data, img_size=args.img_size, dense_epochs=args.dense_epochs, progress=False
    )
    train = build_dataset(args.data, "train", demo.img_size)
    val = build_dataset(args.data, "val", demo.img_size, augment=False)
    val_loader = build_loader(val, 256, train=False)
    classes = num_classes_of(train)
    dense_weights = train_dense_model(demo, out / "dense", train, val, classes, torch.device("cpu"))
    source = {
        "model": demo.model, "pretrained": False, "checkpoint": str(dense_weights.resolve()),
        "img_size": demo.img_size, "num_classes": classes, "model_kwargs": demo.model_kwargs,
    }  # fmt: skip
    net = build_supernet(
        demo.model, checkpoint_path=dense_weights, img_size=demo.img_size, num_classes=classes, **demo.model_kwargs
    )
    lut = build_lookup_table(net)
    affine_net = copy.deepcopy(net)
    affine_net.set_skip_mixer("affine")
    luts = {"identity": lut, "affine": build_lookup_table(affine_net)}  # an affine skip's norm has its cost
    dense_state = {k: v.clone() for k, v in net.state_dict().items()}
    dense_macs = lut.dense_flops()
    magnitude = [unit_ranking(b.mlp) for b in net.blocks]
    in_order = [list(range(h)) for h in net.mlp_hidden]
    # Every candidate trains its weights for the same epochs in all: the search's epochs count for SPViT's subnet,
    # the baselines get them added to their fine-tuning.
    total_epochs = args.search_epochs + args.finetune_epochs
    runs: list[dict[str, Any]] = []
    infeasible: list[dict[str, Any]] = []  # baselines whose shape cannot meet a budget
    no_mlp = [BlockChoice("msa", ()) for _ in net.blocks]
    msa_floor = lut.flops(Architecture(net.name, net.img_size, net.num_classes, tuple(no_mlp)))

    def record(method: str, budget: float | None, seed: int, arch: Architecture, source_net, name: str,
               epochs: int = total_epochs, init: str = "subnet", imitation: bool = False) -> None:  # fmt: skip
        subnet_dir = out / "subnets" / name
        before = one_shot_metrics(source_net, arch, val_loader)["acc1"]
        save_subnet(export_subnet(source_net, arch), subnet_dir, Lineage(source))
        started = time.perf_counter()
        summary = finetune(subnet_dir, out / "finetune" / name, args.data, epochs, seed, init, imitation)
        priced = luts[arch.skip_mixer]
        runs.append(
            {
                "method": method, "budget": budget, "seed": seed, "macs": priced.flops(arch),
                "params": priced.params(arch),
                "acc1": summary["val_acc1"], "acc1_before_finetune": before, "finetune_epochs": epochs,
                "mixers": list(arch.mixers), "mlp_widths": [len(b.mlp_kept) for b in arch.blocks],
                "finetune_s": time.perf_counter() - started,
            }
        )  # fmt: skip
        print(f"{name}: {priced.flops(arch) / dense_macs:.3f}x, top-1 {before:.2f}% -> {summary['val_acc1']:.2f}%",
              flush=True)  # fmt: skip

    methods = set(args.methods)
    for seed in args.seeds if "dense" in methods else []:
        record("dense", None, seed, net.dense_architecture(), net, f"dense_s{seed}", args.finetune_epochs)
    for budget in args.budgets:
        target = int(budget * dense_macs)
        shapes = {
            "magnitude": uniform_architecture(net, lut, target, magnitude),
            "uniform": uniform_architecture(net, lut, target, in_order),
            "attention_drop": attention_drop_architecture(net, lut, target, magnitude, val_loader),
        }
        shapes = {m: arch for m, arch in shapes.items() if m in methods}
        for method in [m for m, arch in shapes.items() if arch is None]:
            infeasible.append({"method": method, "budget": budget, "floor_x_dense": msa_floor / dense_macs})
        shapes = {m: arch for m, arch in shapes.items() if arch is not None}
        for seed in args.seeds:
            if methods & {"spvit", "spvit_dense_init"}:
                search_dir = out / "search" / f"{budget}x_s{seed}"
                run_search(search_config(args, demo, dense_weights, budget, seed, search_dir))
                searched = load_search_supernet(search_dir / "supernet.safetensors")
                arch = Architecture.load(search_dir / "arch.json")
                if "spvit" in methods:
                    record("spvit", budget, seed, arch, searched, f"spvit_{budget}x_s{seed}", args.finetune_epochs)
                if "spvit_dense_init" in methods:
                    record("spvit_dense_init", budget, seed, arch, net, f"spvit_dense_init_{budget}x_s{seed}")
            if methods & {"spvit_affine", "spvit_affine_imitation"}:
                search_dir = out / "search" / f"affine_{budget}x_s{seed}"
                run_search(search_config(args, demo, dense_weights, budget, seed, search_dir, skip_mixer="affine"))
                searched = load_search_supernet(search_dir / "supernet.safetensors")
                arch = Architecture.load(search_dir / "arch.json")
                for method in sorted(methods & {"spvit_affine", "spvit_affine_imitation"}):
                    record(method, budget, seed, arch, searched, f"{method}_{budget}x_s{seed}", args.finetune_epochs,
                           imitation=method.endswith("imitation"))  # fmt: skip
            for method, arch in shapes.items():
                record(method, budget, seed, arch, net, f"{method}_{budget}x_s{seed}")
            if "random" in methods:
                random_gate_logits_(net, seed)
                record("random", budget, seed, project_to_budget(net, lut, target), net, f"random_{budget}x_s{seed}")
                net.load_state_dict(dense_state)  # the gates back at their start, for the next candidates
            if "optuna" in methods:
                optuna_dir = out / "optuna" / f"{budget}x_s{seed}"
                run_optuna(
                    OptunaConfig(
                        model=demo.model, data=args.data, out=str(optuna_dir), target=f"{budget}x",
                        checkpoint=str(dense_weights), img_size=demo.img_size, model_kwargs=demo.model_kwargs,
                        trials=args.optuna_trials, bn_recalibration=4, seed=seed, num_workers=0, progress=False,
                    )
                )  # fmt: skip
                arch = Architecture.load(optuna_dir / "arch.json")
                record("optuna", budget, seed, arch, net, f"optuna_{budget}x_s{seed}")
    return {"dense_macs": dense_macs, "runs": runs, "infeasible": infeasible}


def aggregate(runs: list[dict[str, Any]], dense_macs: int) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (budget, method); MACs as a range when the seeds' architectures differ."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["budget"] or 1.0, METHODS.index(r["method"])), []).append(r)
    rows = []
    for _, group in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1])):
        accs, macs = [r["acc1"] for r in group], [r["macs"] for r in group]
        rows.append(
            {
                "budget": group[0]["budget"], "method": group[0]["method"], "seeds": len(group),
                "acc1_mean": statistics.mean(accs), "acc1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "macs_min": min(macs), "macs_max": max(macs), "x_dense_min": min(macs) / dense_macs,
                "x_dense_max": max(macs) / dense_macs,
            }
        )  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, Any]], infeasible: list[dict[str, Any]]) -> str:
    lines = ["| budget | method | val top-1 mean ± std | MACs (M) | x dense |", "|---|---|---:|---:|---:|"]
    for r in rows:
        macs = _span(r["macs_min"] / 1e6, r["macs_max"] / 1e6, 2)
        ratio = _span(r["x_dense_min"], r["x_dense_max"], 3)
        budget = "dense" if r["budget"] is None else f"{r['budget']}x"
        lines.append(f"| {budget} | {r['method']} | {r['acc1_mean']:.2f} ± {r['acc1_std']:.2f} | {macs} | {ratio} |")
    for r in infeasible:
        lines.append(
            f"| {r['budget']}x | {r['method']} | infeasible: all-msa with no MLP unit is already "
            f"{r['floor_x_dense']:.3f}x | | |"
        )
    return "\n".join(lines)


def _span(low: float, high: float, digits: int) -> str:
    """`low` or `low-high`, whichever the rounding tells apart."""
    a, b = f"{low:.{digits}f}", f"{high:.{digits}f}"
    return a if a == b else f"{a}-{b}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", help="digits, torch/NAME or an image folder")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=32, help="input size of test_vit (patch 4)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dense-epochs", type=int, default=40)
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=10, help="SPViT's; the baselines add the search's")
    parser.add_argument("--optuna-trials", type=int, default=40)
    parser.add_argument(
        "--search-set", type=_setting, action="append", default=[], metavar="KEY=JSON",
        help="a SearchConfig setting over the study's, e.g. gate_init=0.5 (repeatable; the ablations use it)",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/accuracy_study", help="run directories of every candidate")
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--update-results", action="store_true", help="refresh the section in RESULTS.md")
    args = parser.parse_args(argv)
    args.search_set = dict(args.search_set)
    return args


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    if key not in SearchConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{key!r} is not a SearchConfig setting")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    study = run_study(args)
    minutes = (time.perf_counter() - started) / 60
    rows = aggregate(study["runs"], study["dense_macs"])
    table = markdown_table(rows, study["infeasible"])
    results = {
        **study_record("accuracy_study", args, minutes),
        "dense_macs": study["dense_macs"],
        "rows": rows,
        "runs": study["runs"],
        "infeasible": study["infeasible"],
    }
    plot = args.results.with_suffix(".png")
    points = pd.DataFrame(rows).assign(x_dense=lambda f: (f.x_dense_min + f.x_dense_max) / 2)
    atomic_write_bytes(plot, png_bytes(mean_accuracy_vs_macs(points)))
    body = (
        f"Measured {results['date']} on {results['machine']}, torch {torch.__version__}, data `{args.data}`; "
        f"{len(args.seeds)} seeds, dense {args.dense_epochs} epochs, search {args.search_epochs}, fine-tune "
        f"{args.finetune_epochs} epochs with soft KD; {minutes:.1f} minutes in all.\n\n{table}\n\n"
        f"![mean top-1 vs MACs per method](results/{plot.name})"
    )
    save_results("accuracy_study", results, table, body, args.results, args.update_results)
    print(json.dumps({"minutes": round(minutes, 1)}))


if __name__ == "__main__":
    main()
