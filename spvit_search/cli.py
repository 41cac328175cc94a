"""The `spvit` command line.

Bad input ends in a one-line `spvit: error: ...` and exit code 2; a NaN/inf loss in exit code 1; a read or write
the system refused (disk full, permission denied) in exit code 74; SIGINT or SIGTERM (after a checkpoint is saved)
in exit code 130. `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from finetune.devices import AMP_MODES
from finetune.distillation import DISTILLATION_TYPES
from finetune.engine import NonFiniteLossError, TrainingInterrupted
from finetune.optim import GATE_OPTIMIZERS
from supernets.architecture import MIXERS
from supernets.gates import GATE_INITS

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_IO_ERROR = 74  # sysexits.h EX_IOERR
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = f"""exit codes:
  0    success
  {EXIT_FAILED}    the run failed: the loss became NaN or infinite (the last checkpoint is intact)
  {EXIT_BAD_INPUT}    bad input: arguments, names, sizes, budgets, files, datasets, --resume mismatches
  {EXIT_IO_ERROR}   the system refused a read or write: disk full, permission denied, I/O error
       (files are written atomically: every file holds its old or its new content, never a part)
  {EXIT_INTERRUPTED}  SIGINT or SIGTERM: a checkpoint was saved; continue with --resume
errors are one line, 'spvit: error: ...'; spvit --debug COMMAND ... shows the traceback"""
# Path mistakes are the user's to fix (exit 2); any other OSError is the system's (exit 74).
_BAD_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)


def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """`k=v` pairs as timm's train.py takes them; values are Python literals where they parse as one."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs expects key=value pairs, got '{item}'")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def add_model_arguments(parser: argparse.ArgumentParser, weights: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="supernet name, e.g. deit_tiny_patch16_224 (see list_supernets)")
    if weights:
        source = group.add_mutually_exclusive_group()
        source.add_argument("--checkpoint", default=None, help="timm-format weights (.safetensors, .pth, .pt)")
        source.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloads)")
    group.add_argument("--img-size", type=int, default=None, help="input image size (default: the model's)")
    group.add_argument("--num-classes", type=int, default=None, help="classifier classes (default: the model's)")
    group.add_argument(
        "--model-kwargs", nargs="*", default=[], metavar="K=V", help="extra timm model arguments, e.g. patch_size=4"
    )


def add_distillation_arguments(
    parser: argparse.ArgumentParser, default: str, teacher: str = "--teacher-model"
) -> argparse._ArgumentGroup:
    """The distillation flags fine-tuning and the search share; returns their group for more."""
    group = parser.add_argument_group("distillation")
    group.add_argument(
        "--distillation", "--distillation-type", dest="distillation", choices=DISTILLATION_TYPES, default=default,
        help=f"from {teacher}; soft: KL of temperature-scaled outputs; hard: CE on the teacher's top-1 (DeiT)",
    )  # fmt: skip
    group.add_argument("--distillation-alpha", type=float, default=0.5, help="weight of the distillation term")
    group.add_argument("--distillation-tau", type=float, default=1.0, help="soft distillation temperature")
    return group


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", default="digits",
        help="digits (embedded), fashion_mnist (Debian's dataset-fashion-mnist files), torch/NAME, or an image folder",
    )  # fmt: skip
    group.add_argument(
        "--data-root", default=None, help="where torch/NAME datasets live, or the fashion_mnist idx files"
    )
    group.add_argument("--download", action="store_true", help="allow torch/NAME datasets to download")
    group.add_argument("--no-augment", dest="augment", action="store_false", help="no training augmentation")
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument(
        "--workers", type=int, default=None,
        help="data loader worker processes (default: in-process for digits, min(8, CPUs) for folders and torch/NAME)",
    )  # fmt: skip


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
        help="where to compute (auto: CUDA, then MPS, then the CPU; under torchrun cuda is each rank's own GPU)",
    )  # fmt: skip


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --amp (and its alias --bf16) and --compile of the training commands."""
    group = parser.add_argument_group("compute")
    add_device_argument(group)
    group.add_argument(
        "--amp", choices=AMP_MODES, default="auto",
        help="mixed precision of the training forwards (auto: bf16 on a CUDA GPU that supports it, else none; fp16 "
        "scales the loss); gates, complexity loss and costs stay float32 or wider",
    )  # fmt: skip
    group.add_argument("--bf16", dest="amp", action="store_const", const="bf16", help="the same as --amp bf16")
    group.add_argument("--compile", action="store_true", help="torch.compile the model's forward")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", required=True, help="run directory")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps between checkpoints")
    group.add_argument(
        "--log-every", type=int, default=50,
        help="optimizer steps between metrics lines and progress updates (the only points the loop waits for the "
        "device)",
    )  # fmt: skip
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spvit",
        description="Prune vision transformers by architecture search.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lut = sub.add_parser(
        "lut",
        help="price every choice of a model's search space",
        description="Build the FLOPs (MACs) and params lookup table of a model's search space, print its dense, "
        "min and max MACs and a per-block table, and write it as CSV.",
    )
    add_model_arguments(lut)
    lut.add_argument("--convention", choices=("fvcore", "core", "spvit"), default="fvcore", help="how MACs count")
    lut.add_argument("--out", default=None, help="CSV file to write (default: print only)")
    add_device_argument(lut)

    search = sub.add_parser(
        "search",
        help="search an architecture under a FLOPs budget",
        description="Train the supernet's gates and weights so that its architecture lands on --target MACs. "
        "Writes config.json, metrics.jsonl, arch_epoch{N}.json, arch.json, supernet.safetensors and summary.json "
        "into --out. Runs under torchrun for DDP.",
    )
    add_model_arguments(search, weights=True)
    add_data_arguments(search)
    budget = search.add_argument_group("budget and complexity loss")
    budget.add_argument("--target", required=True, help="MACs budget: 3.2G, 3200M, or 0.6x of dense")
    budget.add_argument("--convention", choices=("fvcore", "core", "spvit"), default="fvcore", help="how MACs count")
    budget.add_argument("--lut", default=None, help="lookup table CSV from `spvit lut` (default: build it)")
    budget.add_argument(
        "--complexity-loss", choices=("auto", "normalized", "paper"), default="auto",
        help="auto: normalized loss with λ by dual ascent; paper: λ·(T-F)² in GMACs",
    )  # fmt: skip
    budget.add_argument("--lam", type=float, default=1.0, help="λ (the starting value for auto)")
    budget.add_argument("--lambda-lr", type=float, default=0.02, help="auto: log-λ step per optimizer step")
    budget.add_argument("--estimator", choices=("threshold", "expected"), default="threshold", help="MACs of the gates")
    budget.add_argument(
        "--tolerance", type=float, default=0.01, help="relative distance to the target that is on target"
    )
    budget.add_argument("--patience", type=int, default=3, help="stop after this many on-target epochs in a row")
    budget.add_argument("--no-project", dest="project", action="store_false", help="skip the final budget projection")
    optim = search.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--lr", type=float, default=2e-4, help="weights learning rate (AdamW, warmup-cosine)")
    optim.add_argument("--gate-lr", type=float, default=0.02, help="gate logits learning rate (AdamW, no decay)")
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--warmup-epochs", type=int, default=0)
    optim.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    optim.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm (0: off)")
    optim.add_argument("--gate-init", type=float, default=1.5, help="initial gate logit")
    optim.add_argument("--gate-temperature", type=float, default=1.0, help="binary-concrete temperature")
    optim.add_argument("--head-mix-temperature", type=float, default=0.01, help="softmax temperature of z")
    optim.add_argument("--sync-gates", action="store_true", help="DDP: the same gate draws on every rank")
    optim.add_argument(
        "--gate-optimizer", choices=GATE_OPTIMIZERS, default="adam",
        help="adam: one second moment per gate; shared_adam: one for all gates (steps follow the mean gradients)",
    )  # fmt: skip
    optim.add_argument(
        "--gate-init-from", choices=GATE_INITS, default="constant",
        help="constant: every logit --gate-init; magnitude: MLP logits spread by magnitude rank, mean --gate-init",
    )  # fmt: skip
    add_distillation_arguments(search, default="none", teacher="the dense source model (the supernet as it starts)")
    study = search.add_argument_group("optuna strategy (--strategy optuna)")
    study.add_argument(
        "--strategy", choices=("gradient", "optuna"), default="gradient",
        help="gradient: train the gates (default); optuna: sample discrete choices, score them with shared weights",
    )  # fmt: skip
    study.add_argument("--trials", type=int, default=30, help="finished trials of the whole study")
    study.add_argument(
        "--objective", choices=("accuracy", "pareto"), default="accuracy",
        help="accuracy: best top-1 under the budget; pareto: top-1 vs MACs (multi-objective)",
    )  # fmt: skip
    study.add_argument("--sampler", choices=("tpe", "random", "nsga2"), default="tpe")
    study.add_argument("--storage", default=None, help="journal file or sqlite:/// URL (default OUT/study.journal)")
    study.add_argument("--study-name", default="spvit", help="the study's name in --storage")
    study.add_argument("--supernet", default=None, help="a search run's supernet.safetensors to score with")
    study.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS, help="mixers a block may take")
    study.add_argument(
        "--mlp-ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0], help="shares of MLP units a block keeps"
    )
    study.add_argument("--bn-recalibration", type=int, default=0, help="train batches to re-estimate BN statistics")
    study.add_argument("--eval-batches", type=int, default=0, help="val batches per candidate (0: all)")
    add_compute_arguments(search)
    add_run_arguments(search)

    export = sub.add_parser(
        "export",
        help="export a searched architecture as a plain PyTorch model",
        description="Build the plain subnet of a search run's architecture (no gates: standard attention, real "
        "convolutions for bconv blocks, MLPs cut to their kept units) and write arch.json, config.json and "
        "model.safetensors into --out. Load it with spvit_search.export.load_subnet(DIR), or with "
        "timm.create_model('spvit_subnet', subnet_dir=DIR) after `import spvit_search.export`.",
    )
    export.add_argument("--run", required=True, help="search run directory (supernet.safetensors, arch.json, lut.csv)")
    export.add_argument("--arch", default=None, help="architecture JSON to export (default: the run's arch.json)")
    export.add_argument("--out", required=True, help="subnet directory to write")
    export.add_argument("--fold-bn", action="store_true", help="fold each bconv's BN into its conv, for inference")
    export.add_argument(
        "--round-mlp", type=int, default=None, metavar="N",
        help="round kept MLP widths up to a multiple of N, adding back the dropped units with the largest gate "
        "logits; the rounded architecture is re-priced with the run's lut.csv",
    )  # fmt: skip
    export.add_argument(
        "--onnx", action="store_true",
        help="also write model.onnx (needs onnx and onnxscript); checked against PyTorch if onnxruntime is installed",
    )  # fmt: skip

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune an exported subnet with knowledge distillation",
        description="Train a subnet directory (from `spvit export`) with distillation from a teacher: by default the "
        "dense model it was searched from. Writes config.json, metrics.jsonl, best/ and last/ (subnet directories), "
        "arch.json and summary.json into --out. Runs under torchrun for DDP.",
    )
    finetune.add_argument("--subnet", required=True, help="subnet directory written by `spvit export`")
    finetune.add_argument(
        "--init", choices=("subnet", "dense"), default="subnet",
        help="start from the subnet's weights (the search's) or from the dense source model's (the paper's choice)",
    )  # fmt: skip
    add_data_arguments(finetune)
    teacher = add_distillation_arguments(finetune, default="soft")
    teacher.add_argument(
        "--teacher-model", default=None,
        help="a model name (with --teacher-checkpoint) or a subnet directory (default: the subnet's dense source)",
    )  # fmt: skip
    teacher.add_argument("--teacher-checkpoint", "--teacher-path", default=None, help="weights of --teacher-model")
    teacher.add_argument("--teacher-pretrained", action="store_true", help="timm's pretrained teacher (downloads)")
    optim = finetune.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30)
    optim.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate, warmup then cosine")
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--warmup-epochs", type=int, default=1)
    optim.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    optim.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm (0: off)")
    optim.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights; evaluate and save it")
    optim.add_argument("--model-ema-decay", type=float, default=0.9998)
    add_compute_arguments(finetune)
    add_run_arguments(finetune)

    evaluate = sub.add_parser(
        "eval",
        help="top-1, top-5, MACs, params and latency of a model",
        description="Evaluate a subnet directory or a model (timm name with weights) on a dataset's val split.",
    )
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--subnet", default=None, help="subnet directory (spvit export, or finetune's best/ last/)")
    which.add_argument("--model", default=None, help="timm or supernet model name")
    weights = evaluate.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", default=None, help="--model's weights (timm format)")
    weights.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloads)")
    evaluate.add_argument("--img-size", type=int, default=None, help="--model's input size (default: the model's)")
    evaluate.add_argument("--num-classes", type=int, default=None, help="--model's classes (default: the dataset's)")
    evaluate.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V", help="extra --model arguments")
    add_data_arguments(evaluate)
    evaluate.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement")
    add_device_argument(evaluate)
    evaluate.add_argument("--compile", action="store_true", help="torch.compile the model for accuracy and latency")

    demo = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded digits data",
        description="Train a tiny dense ViT on digits (cached for reruns), build its lookup table, search at 0.5x "
        "MACs, export, fine-tune with soft distillation, evaluate dense vs subnet and write the report.",
    )
    demo.add_argument("--out", default="runs/demo", help="where the demo's run directories go")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_device_argument(demo)

    report = sub.add_parser(
        "report",
        help="tables and plots of runs: index.html (self-contained) and report.md",
        description="Report on search, Optuna and fine-tune run directories (or directories of runs, such as a "
        "demo's): per-block architecture and costs, gate trajectories, MACs vs target, training curves and, with "
        "several runs, a comparison with the accuracy-vs-MACs Pareto front. Missing or damaged files are left "
        "out with a warning.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories of runs")
    report.add_argument("--out", required=True, help="the report directory (an earlier report there is replaced)")
    return parser


def run_lut(args: argparse.Namespace) -> None:
    from finetune.devices import resolve_device
    from lookup_tables import build_lookup_table
    from supernets import build_supernet

    device = resolve_device(args.device)
    net = build_supernet(
        args.model, img_size=args.img_size, num_classes=args.num_classes, **parse_model_kwargs(args.model_kwargs)
    ).to(device)
    lut = build_lookup_table(net, args.convention)
    low, high = lut.range()
    dense = lut.dense_flops()
    print(f"{args.model} at {net.img_size}px, {net.num_classes} classes, '{args.convention}' convention")
    print(f"dense {dense / 1e9:.4f} GMACs, {lut.params(net.dense_architecture()) / 1e6:.3f} M params")
    print(f"range {low / 1e9:.4f} .. {high / 1e9:.4f} GMACs ({low / dense:.3f}x .. {high / dense:.3f}x of dense)")
    print(lut.summary().to_string())
    if args.out:
        lut.save(args.out)
        print(f"wrote {args.out}")


def run_search_command(args: argparse.Namespace) -> None:
    if args.strategy == "optuna":
        run_optuna_command(args)
        return
    from .search import SearchConfig, run_search

    config = SearchConfig(
        model=args.model, data=args.data, out=args.out, target=args.target, checkpoint=args.checkpoint,
        pretrained=args.pretrained, img_size=args.img_size, num_classes=args.num_classes,
        model_kwargs=parse_model_kwargs(args.model_kwargs), convention=args.convention, lut=args.lut,
        complexity_loss=args.complexity_loss, lam=args.lam, lambda_lr=args.lambda_lr, estimator=args.estimator,
        tolerance=args.tolerance, patience=args.patience, project=args.project, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, gate_lr=args.gate_lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.smoothing, grad_clip=args.clip_grad or None,
        gate_init=args.gate_init, gate_temperature=args.gate_temperature, gate_optimizer=args.gate_optimizer,
        gate_init_from=args.gate_init_from, distillation=args.distillation,
        distillation_alpha=args.distillation_alpha, distillation_tau=args.distillation_tau,
        head_mix_temperature=args.head_mix_temperature, sync_gates=args.sync_gates, data_root=args.data_root,
        download=args.download, augment=args.augment, num_workers=args.workers, seed=args.seed,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=args.progress,
        device=args.device, amp=args.amp, compile=args.compile,
    )  # fmt: skip
    summary = run_search(config, resume=args.resume)
    if summary is None:  # a DDP rank other than 0
        return
    print(
        f"searched {summary['model']}: {summary['macs'] / 1e9:.4f} GMACs "
        f"({summary['macs'] / summary['dense_macs']:.3f}x of dense, target {summary['target_macs'] / 1e9:.4f}), "
        f"{summary['params'] / 1e6:.3f} M params, val top-1 {summary['val_acc1']:.2f}%"
    )
    print(f"mixers {summary['mixers']}, MLP units kept {summary['mlp_kept']:.1%}; wrote {args.out}/arch.json")


def run_optuna_command(args: argparse.Namespace) -> None:
    from .optuna_search import COMPILE_NOTE, OptunaConfig, run_optuna

    if args.compile:
        print(f"spvit: note: {COMPILE_NOTE}", file=sys.stderr)
    if args.resume:
        raise ValueError("--strategy optuna continues a study by running the same command again, without --resume")
    config = OptunaConfig(
        model=args.model, data=args.data, out=args.out, target=args.target, checkpoint=args.checkpoint,
        pretrained=args.pretrained, supernet=args.supernet, img_size=args.img_size, num_classes=args.num_classes,
        model_kwargs=parse_model_kwargs(args.model_kwargs), convention=args.convention, lut=args.lut,
        trials=args.trials, objective=args.objective, sampler=args.sampler, storage=args.storage,
        study_name=args.study_name, mixers=args.mixers, mlp_ratios=args.mlp_ratios,
        bn_recalibration=args.bn_recalibration, eval_batches=args.eval_batches, batch_size=args.batch_size,
        data_root=args.data_root, download=args.download, num_workers=args.workers, seed=args.seed,
        progress=args.progress, device=args.device,
    )  # fmt: skip
    summary = run_optuna(config)
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items() if n)
    print(
        f"optuna study of {summary['model']}: {counts}; best trial {summary['best_trial']}: "
        f"{summary['macs'] / 1e9:.4f} GMACs ({summary['macs'] / summary['dense_macs']:.3f}x of dense, target "
        f"{summary['target_macs'] / 1e9:.4f}), val top-1 {summary['val_acc1']:.2f}% with shared weights"
    )
    print(f"wrote {args.out}/trials.csv, pareto.json and arch.json")


def run_export(args: argparse.Namespace) -> None:
    from lookup_tables import LookupTable
    from supernets import MIXERS, Architecture

    from .export import (
        check_onnx_exporter,
        export_onnx,
        export_subnet,
        load_search_supernet,
        round_mlp,
        save_subnet,
        subnet_source,
    )

    if args.onnx:
        check_onnx_exporter()
    run, out = Path(args.run), Path(args.out)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    lut = LookupTable.load(run / "lut.csv")
    arch = Architecture.load(args.arch or run / "arch.json")
    net = load_search_supernet(run / "supernet.safetensors")
    lut.check_supernet(net)
    macs = lut.flops(arch)
    if args.round_mlp is not None:
        rounded = round_mlp(arch, net, args.round_mlp)
        units = [sum(len(b.mlp_kept) for b in a.blocks) for a in (arch, rounded)]
        print(
            f"--round-mlp {args.round_mlp}: {units[0]} -> {units[1]} MLP units kept, "
            f"{macs / 1e9:.4f} -> {lut.flops(rounded) / 1e9:.4f} GMACs"
        )
        arch, macs = rounded, lut.flops(rounded)
    subnet = export_subnet(net, arch, fold_bn=args.fold_bn)
    save_subnet(subnet, out, source=subnet_source(run, arch))
    params = sum(p.numel() for p in subnet.parameters())
    mixers = ", ".join(f"{arch.mixers.count(m)} {m}" for m in MIXERS)
    print(
        f"exported {arch.model}: {macs / 1e9:.4f} GMACs ({macs / lut.dense_flops():.3f}x of dense, "
        f"'{lut.convention}' convention), {params / 1e6:.3f} M params{' (BN folded)' if args.fold_bn else ''}; "
        f"blocks: {mixers}"
    )
    print(f"wrote {out}/arch.json, config.json and model.safetensors")
    if args.onnx:
        difference = export_onnx(subnet, out / "model.onnx")
        if difference is None:
            print(f"wrote {out}/model.onnx (not checked: onnxruntime is not installed)")
        else:
            print(f"wrote {out}/model.onnx (onnxruntime matches PyTorch: max logit difference {difference:.2e})")


def run_finetune_command(args: argparse.Namespace) -> None:
    from .finetuning import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        subnet=args.subnet, data=args.data, out=args.out, init=args.init, teacher_model=args.teacher_model,
        teacher_checkpoint=args.teacher_checkpoint, teacher_pretrained=args.teacher_pretrained,
        distillation=args.distillation, distillation_alpha=args.distillation_alpha,
        distillation_tau=args.distillation_tau, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.smoothing,
        grad_clip=args.clip_grad or None, model_ema=args.model_ema, model_ema_decay=args.model_ema_decay,
        data_root=args.data_root, download=args.download, augment=args.augment, num_workers=args.workers,
        seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=args.progress,
        device=args.device, amp=args.amp, compile=args.compile,
    )  # fmt: skip
    summary = run_finetune(config, resume=args.resume)
    if summary is None:  # a DDP rank other than 0
        return
    teacher = summary["teacher_val_acc1"]
    print(
        f"fine-tuned {summary['model']} for {summary['epochs']} epochs ({summary['distillation']} distillation): "
        f"val top-1 {summary['val_acc1']:.2f}% (best {summary['best_val_acc1']:.2f}%)"
        + (f", teacher {teacher:.2f}%" if teacher is not None else "")
    )
    print(f"wrote {args.out}/last and {args.out}/best (subnet directories) and summary.json")


def run_eval(args: argparse.Namespace) -> None:
    from finetune.devices import pin_memory, resolve_device
    from supernets.registry import create_source_model

    from .data import build_dataset, build_loader, loader_workers, num_classes_of
    from .evaluation import describe_model, format_description
    from .export import load_subnet

    device = resolve_device(args.device)
    if args.subnet is not None:
        if args.checkpoint or args.pretrained or args.model_kwargs or args.img_size or args.num_classes:
            raise ValueError("--checkpoint, --pretrained, --img-size, --num-classes and --model-kwargs go with --model")
        model = load_subnet(args.subnet)
        img_size, name = model.arch.img_size, args.subnet
    else:
        model = None
        img_size, name = args.img_size, args.model
    if img_size is None:
        from timm.models import get_pretrained_cfg_value

        size = get_pretrained_cfg_value(args.model, "input_size")
        img_size = size[-1] if size else 224
    val = build_dataset(args.data, "val", img_size, args.download, args.data_root, augment=False)
    if model is None:
        classes = args.num_classes or num_classes_of(val)
        model = create_source_model(
            args.model, args.pretrained, args.checkpoint, img_size, classes, **parse_model_kwargs(args.model_kwargs)
        )
    workers = loader_workers(args.data, args.workers)
    loader = build_loader(val, args.batch_size, train=False, num_workers=workers, pin_memory=pin_memory(device))
    model = model.to(device).eval()
    described = describe_model(model, loader, img_size, args.latency_batch, compiled=args.compile)
    print(format_description(name, described))


def run_demo_command(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, progress=args.progress, device=args.device))


def run_report(args: argparse.Namespace) -> None:
    from reports import write_report

    report = write_report(args.runs, args.out)
    for warning in report.warnings:
        print(f"spvit: warning: {warning}", file=sys.stderr)
    print(f"report on {len(report.runs)} run(s): {report.out_dir / 'index.html'}, {report.out_dir / 'report.md'}")


COMMANDS = {
    "lut": run_lut,
    "search": run_search_command,
    "export": run_export,
    "finetune": run_finetune_command,
    "eval": run_eval,
    "demo": run_demo_command,
    "report": run_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # fvcore's dependencies script functions at import; the deprecation is theirs to act on, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
    try:
        COMMANDS[args.command](args)
    except (ValueError, *_BAD_PATH_ERRORS) as e:
        return _fail(args, EXIT_BAD_INPUT, f"spvit: error: {_one_line(e)}")
    except OSError as e:  # disk full, permission denied, I/O error: atomic writes left no partial file
        return _fail(args, EXIT_IO_ERROR, f"spvit: error: {_one_line(e)} (the system refused a read or write; "
                     "files written before are intact)")  # fmt: skip
    except TrainingInterrupted as e:
        return _fail(args, EXIT_INTERRUPTED, f"spvit: {_one_line(e)}")
    except KeyboardInterrupt:
        return _fail(args, EXIT_INTERRUPTED, "spvit: interrupted")
    except NonFiniteLossError as e:
        return _fail(args, EXIT_FAILED, f"spvit: error: {_one_line(e)}")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    """Print the one-line message (after the traceback with --debug) and return the exit code."""
    if args.debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
