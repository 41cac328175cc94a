"""The `spvit` command line.

Bad input ends in a one-line `spvit: error: ...` and exit code 2; a NaN/inf loss in exit code 1; a read or write
the system refused (disk full, permission denied) in exit code 74; SIGINT or SIGTERM (after a checkpoint is saved)
in exit code 130. `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from finetune.engine import NonFiniteLossError, TrainingInterrupted
from reports.run_format import ARCH, LUT, SUPERNET

from .settings import SettingsFileError, SettingsParser, add_settings, group, inherit, setting, settings_from_args

# The configs' modules import fvcore, whose dependencies script functions at import: the deprecation is theirs to act
# on, not the user's, and a command's stderr is its own one-line messages.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")

from lookup_tables.latency import DTYPES  # noqa: E402

from .data import TrainDataConfig  # noqa: E402
from .demo import DemoConfig  # noqa: E402
from .finetuning import FinetuneConfig  # noqa: E402
from .optuna_search import OptunaConfig, study_setting  # noqa: E402
from .runs import (  # noqa: E402
    RESUME_MODES,
    ComputeSettings,
    DeviceSettings,
    ModelSettings,
    SearchSpaceSettings,
    WeightsSettings,
)
from .search import BudgetSettings, SearchConfig  # noqa: E402

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

export_setting = group("export")


latency_setting = group("latency")


@dataclass(kw_only=True)
class LutConfig(DeviceSettings, SearchSpaceSettings, ModelSettings):
    num_classes: int | None = inherit(ModelSettings, "num_classes", default_text="the model's")
    convention: str = inherit(BudgetSettings, "convention", group="lookup table")
    out: str | None = setting(None, group="lookup table", help="CSV file to write", default_text="print only")
    latency: bool = latency_setting(
        False, help="also measure every choice's latency on --device, and the correction of their sum end to end"
    )
    batch: int = latency_setting(1, help="images per timed forward")
    dtype: str = latency_setting("fp32", choices=tuple(DTYPES), help="the timed forwards' precision (autocast)")
    threads: int | None = latency_setting(None, help="CPU threads of the timings", default_text="torch's")
    mlp_points: int = latency_setting(32, help="MLP widths timed per block, evenly spaced; linear in between")


@dataclass(kw_only=True)
class ExportConfig:
    run: str = export_setting(help="search run directory (supernet.safetensors, arch.json, lut.csv)")
    arch: str | None = export_setting(None, help="architecture JSON to export", default_text="the run's arch.json")
    out: str = export_setting(help="subnet directory to write")
    fold_bn: bool = export_setting(False, help="fold each bconv's BN into its conv, for inference")
    skip_mixer: str | None = inherit(
        SearchSpaceSettings, "skip_mixer", None, group="export", default_text="the run's",
        help="export the skip blocks as identity or as affine skips (from an identity run: s = 1, t = 0, to train)",
    )  # fmt: skip
    round_mlp: int | None = export_setting(
        None, metavar="N", default_text="none",
        help="round kept MLP widths up to a multiple of N, adding back the dropped units with the largest gate "
        "logits; the rounded architecture is re-priced with the run's lut.csv",
    )  # fmt: skip
    onnx: bool = export_setting(
        False,
        help="also write model.onnx (needs onnx and onnxscript); checked against PyTorch if onnxruntime is installed",
    )


# `--no-augment` does nothing here; eval has always taken the data flags of the training commands.
@dataclass(kw_only=True)
class EvalConfig(DeviceSettings, TrainDataConfig, WeightsSettings, ModelSettings):
    subnet: str | None = setting(
        None, group="model", exclusive="source", required=True,
        help="subnet directory (spvit export, or finetune's best/ last/)",
    )  # fmt: skip
    model: str | None = inherit(
        ModelSettings, "model", None, exclusive="source", required=True, help="timm or supernet model name"
    )
    latency_batch: int = setting(1, group="data", help="batch size of the latency measurement")
    lut: str | None = setting(
        None, group="model", default_text="none",
        help="a latency lookup table (`spvit lut --latency`) of the subnet's supernet: its prediction is printed next "
        "to the measured latency",
    )  # fmt: skip
    compile: bool = inherit(ComputeSettings, "compile", help="torch.compile the model for accuracy and latency")


@dataclass(kw_only=True)
class ReportConfig:
    runs: list[str] = setting(
        group="report", positional=True, metavar="RUN_DIR", help="run directories, or directories of runs"
    )
    out: str = setting(group="report", help="the report directory (an earlier report there is replaced)")


@dataclass(kw_only=True)
class ResumeOption:
    """How a training command treats its run directory; not a setting of the run."""

    resume: str = setting(
        "no", group="run", choices=tuple(RESUME_MODES), nargs="?", const="yes", metavar="auto",
        help="continue the run in --out from its checkpoint; `--resume auto` continues one if there is a checkpoint "
        "and starts one otherwise (the command for `torchrun --max-restarts`)",
    )  # fmt: skip


@dataclass(kw_only=True)
class SearchCommand(ResumeOption):
    strategy: str = study_setting(
        "gradient", choices=("gradient", "optuna"),
        help="gradient: train the gates; optuna: sample discrete choices, score them with shared weights",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spvit",
        description="Prune vision transformers by architecture search.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SettingsParser)

    lut = sub.add_parser(
        "lut",
        help="price every choice of a model's search space",
        description="Build the FLOPs (MACs) and params lookup table of a model's search space, print its dense, "
        "min and max MACs and a per-block table, and write it as CSV.",
    )
    add_settings(lut, LutConfig)

    search = sub.add_parser(
        "search",
        help="search an architecture under a FLOPs budget",
        description="Train the supernet's gates and weights so that its architecture lands on --target MACs. "
        "Writes config.json, metrics.jsonl, arch_epoch{N}.json, arch.json, supernet.safetensors and summary.json "
        "into --out. Runs under torchrun for DDP.",
    )
    add_settings(search, SearchConfig, SearchCommand, OptunaConfig)

    export = sub.add_parser(
        "export",
        help="export a searched architecture as a plain PyTorch model",
        description="Build the plain subnet of a search run's architecture (no gates: standard attention, real "
        "convolutions for bconv blocks, MLPs cut to their kept units) into --out, a timm model folder: "
        "model.safetensors, config.json, arch.json and a model card (README.md) with the search run's figures. "
        "Load it with spvit_search.load_subnet(DIR), or with timm.create_model('local-dir:DIR') after "
        "`import spvit_search`; uploaded to the Hugging Face Hub, with timm.create_model('hf-hub:user/name').",
    )
    add_settings(export, ExportConfig)

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune an exported subnet with knowledge distillation",
        description="Train a subnet directory (from `spvit export`) with distillation from a teacher: by default the "
        "dense model it was searched from. Writes config.json, metrics.jsonl, best/ and last/ (subnet directories), "
        "arch.json and summary.json into --out. Runs under torchrun for DDP.",
    )
    add_settings(finetune, FinetuneConfig, ResumeOption)

    evaluate = sub.add_parser(
        "eval",
        help="top-1, top-5, MACs, params and latency of a model",
        description="Evaluate a subnet directory or a model (timm name with weights) on a dataset's val split.",
    )
    add_settings(evaluate, EvalConfig)

    demo = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded digits data",
        description="Train a tiny dense ViT on digits (cached for reruns), build its lookup table, search at 0.5x "
        "MACs, export, fine-tune with soft distillation, evaluate dense vs subnet and write the report.",
    )
    add_settings(demo, DemoConfig)

    report = sub.add_parser(
        "report",
        help="tables and plots of runs: index.html (self-contained) and report.md",
        description="Report on search, Optuna and fine-tune run directories (or directories of runs, such as a "
        "demo's): per-block architecture and costs, gate trajectories, MACs vs target, training curves and, with "
        "several runs, a comparison with the accuracy-vs-MACs Pareto front. Missing or damaged files are left "
        "out with a warning.",
    )
    add_settings(report, ReportConfig, settings_file=False)
    return parser


def run_lut(args: argparse.Namespace) -> None:
    import torch

    from finetune.devices import resolve_device
    from lookup_tables import LatencyContext, Timer, build_latency_table, build_lookup_table
    from supernets import GateConfig, build_supernet

    from .export import export_subnet

    config = settings_from_args(LutConfig, args)
    device = resolve_device(config.device)
    gates = GateConfig(skip_mixer=config.skip_mixer)
    net = build_supernet(
        config.model, img_size=config.img_size, num_classes=config.num_classes, gates=gates, **config.model_kwargs
    ).to(device)
    if config.latency:
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads or threads)
        try:
            context = LatencyContext.of(device, config.batch, config.dtype, config.threads)
            lut = build_latency_table(net, lambda arch: export_subnet(net, arch), context, Timer(device),
                                      config.convention, config.mlp_points)  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    else:
        lut = build_lookup_table(net, config.convention)
    low, high = lut.range()
    dense = lut.dense_flops()
    print(f"{config.model} at {net.img_size}px, {net.num_classes} classes, '{config.convention}' convention")
    print(f"dense {dense / 1e9:.4f} GMACs, {lut.params(net.dense_architecture()) / 1e6:.3f} M params")
    print(f"range {low / 1e9:.4f} .. {high / 1e9:.4f} GMACs ({low / dense:.3f}x .. {high / dense:.3f}x of dense)")
    print(lut.summary().to_string())
    if config.latency:
        header = lut.meta["latency"]
        print(f"latency on {context.describe()}: dense {lut.latency(net.dense_architecture()):.3f} ms per batch")
        for check in header["checks"]:
            error = check["predicted_ms"] / check["measured_ms"] - 1
            fitted = "" if check["fitted"] else ", not fitted"
            print(f"  {check['arch']}: measured {check['measured_ms']:.3f} ms, predicted {check['predicted_ms']:.3f} "
                  f"ms ({error:+.1%}{fitted})")  # fmt: skip
        print(f"  correction: {header['scale']:.3f} x the sum of the parts + {header['offset']:.3f} ms")
    if config.out:
        lut.save(config.out)
        print(f"wrote {config.out}")


def run_search_command(args: argparse.Namespace) -> None:
    if args.strategy == "optuna":
        run_optuna_command(args)
        return
    from .search import run_search

    config = settings_from_args(SearchConfig, args)
    summary = run_search(config, resume=RESUME_MODES[args.resume])
    if summary is None:  # a DDP rank other than 0
        return
    if summary["metric"] == "latency":
        budget = (
            f"{summary['latency_ms']:.3f} ms predicted ({summary['latency_ms'] / summary['dense_latency_ms']:.3f}x "
            f"of dense, target {summary['target_latency_ms']:.3f} ms), {summary['macs'] / 1e9:.4f} GMACs"
        )
        if "measured_latency_ms" in summary:
            measured = summary["measured_latency_ms"]
            budget += (f", {measured:.3f} ms measured ({measured / summary['dense_latency_ms']:.3f}x; "
                       f"{len(summary['latency_projections'])} projection(s))")  # fmt: skip
    else:
        budget = (
            f"{summary['macs'] / 1e9:.4f} GMACs ({summary['macs'] / summary['dense_macs']:.3f}x of dense, target "
            f"{summary['target_macs'] / 1e9:.4f})"
        )
    print(
        f"searched {summary['model']}: {budget}, {summary['params'] / 1e6:.3f} M params, "
        f"val top-1 {summary['val_acc1']:.2f}%"
    )
    print(f"mixers {summary['mixers']}, MLP units kept {summary['mlp_kept']:.1%}; wrote {config.out}/arch.json")


def run_optuna_command(args: argparse.Namespace) -> None:
    from .optuna_search import COMPILE_NOTE, run_optuna

    if args.compile:
        print(f"spvit: note: {COMPILE_NOTE}", file=sys.stderr)
    if args.resume != "no":
        raise ValueError("--strategy optuna continues a study by running the same command again, without --resume")
    config = settings_from_args(OptunaConfig, args)
    summary = run_optuna(config)
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items() if n)
    print(
        f"optuna study of {summary['model']}: {counts}; best trial {summary['best_trial']}: "
        f"{summary['macs'] / 1e9:.4f} GMACs ({summary['macs'] / summary['dense_macs']:.3f}x of dense, target "
        f"{summary['target_macs'] / 1e9:.4f}), val top-1 {summary['val_acc1']:.2f}% with shared weights"
    )
    print(f"wrote {config.out}/trials.csv, pareto.json and arch.json")


def run_export(args: argparse.Namespace) -> None:
    from lookup_tables import LookupTable
    from supernets import MIXERS, Architecture

    from .export import check_onnx_exporter, export_onnx, export_subnet, load_search_supernet, round_mlp
    from .model_card import save_search_subnet

    config = settings_from_args(ExportConfig, args)
    if config.onnx:
        check_onnx_exporter()
    run, out = Path(config.run), Path(config.out)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    lut = LookupTable.load(run / LUT)
    arch = Architecture.load(config.arch or run / ARCH)
    net = load_search_supernet(run / SUPERNET)
    lut.check_supernet(net)
    macs = lut.flops(arch)
    if config.round_mlp is not None:
        rounded = round_mlp(arch, net, config.round_mlp)
        units = [sum(len(b.mlp_kept) for b in a.blocks) for a in (arch, rounded)]
        print(
            f"--round-mlp {config.round_mlp}: {units[0]} -> {units[1]} MLP units kept, "
            f"{macs / 1e9:.4f} -> {lut.flops(rounded) / 1e9:.4f} GMACs"
        )
        arch, macs = rounded, lut.flops(rounded)
    if config.skip_mixer not in (None, arch.skip_mixer):
        print(
            f"--skip-mixer {config.skip_mixer}: the run's skip blocks are {arch.skip_mixer}; its lut.csv prices those"
        )
        net.set_skip_mixer(config.skip_mixer)
        arch = dataclasses.replace(arch, skip_mixer=config.skip_mixer)
    subnet = export_subnet(net, arch, fold_bn=config.fold_bn)
    for warning in save_search_subnet(subnet, out, run, lut, net.dense_architecture()):
        print(f"spvit: warning: {warning}", file=sys.stderr)
    params = sum(p.numel() for p in subnet.parameters())
    mixers = ", ".join(f"{arch.mixers.count(m)} {m}" for m in MIXERS)
    print(
        f"exported {arch.model}: {macs / 1e9:.4f} GMACs ({macs / lut.dense_flops():.3f}x of dense, "
        f"'{lut.convention}' convention), {params / 1e6:.3f} M params{' (BN folded)' if config.fold_bn else ''}; "
        f"blocks: {mixers}"
    )
    print(f"wrote {out}/model.safetensors, config.json, arch.json and README.md")
    if config.onnx:
        difference = export_onnx(subnet, out / "model.onnx")
        if difference is None:
            print(f"wrote {out}/model.onnx (not checked: onnxruntime is not installed)")
        else:
            print(f"wrote {out}/model.onnx (onnxruntime matches PyTorch: max logit difference {difference:.2e})")


def run_finetune_command(args: argparse.Namespace) -> None:
    from .finetuning import run_finetune

    config = settings_from_args(FinetuneConfig, args)
    summary = run_finetune(config, resume=RESUME_MODES[args.resume])
    if summary is None:  # a DDP rank other than 0
        return
    teacher = summary["teacher_val_acc1"]
    print(
        f"fine-tuned {summary['model']} for {summary['epochs']} epochs ({summary['distillation']} distillation): "
        f"val top-1 {summary['val_acc1']:.2f}% (best {summary['best_val_acc1']:.2f}%)"
        + (f", teacher {teacher:.2f}%" if teacher is not None else "")
    )
    print(f"wrote {config.out}/last and {config.out}/best (subnet directories) and summary.json")


def run_eval(args: argparse.Namespace) -> None:
    from finetune.devices import pin_memory, resolve_device
    from lookup_tables import LatencyContext, LookupTable
    from supernets.registry import create_source_model

    from .data import build_dataset, build_loader, loader_workers, num_classes_of
    from .evaluation import describe_model, format_description
    from .export import load_subnet
    from .search import img_size_of

    config = settings_from_args(EvalConfig, args)
    device = resolve_device(config.device)
    if config.subnet is not None:
        if config.checkpoint or config.pretrained or config.model_kwargs or config.img_size or config.num_classes:
            raise ValueError("--checkpoint, --pretrained, --img-size, --num-classes and --model-kwargs go with --model")
        model = load_subnet(config.subnet)
        img_size, name = model.arch.img_size, config.subnet
    else:
        model = None
        img_size, name = img_size_of(config.model, config.img_size), config.model
    val = build_dataset(config.data, "val", img_size, config.download, config.data_root, augment=False)
    if model is None:
        classes = config.num_classes or num_classes_of(val)
        model = create_source_model(
            config.model, config.pretrained, config.checkpoint, img_size, classes, **config.model_kwargs
        )
    workers = loader_workers(config.data, config.num_workers)
    loader = build_loader(val, config.batch_size, train=False, num_workers=workers, pin_memory=pin_memory(device))
    model = model.to(device).eval()
    described = describe_model(model, loader, img_size, config.latency_batch, compiled=config.compile)
    print(format_description(name, described))
    if config.lut is not None:
        if config.subnet is None:
            raise ValueError("--lut predicts a subnet's latency: give --subnet")
        lut = LookupTable.load(config.lut)
        context = LatencyContext.of(device, config.latency_batch, "fp32")
        predicted = lut.latency(model.arch, context)
        error = predicted / described["latency_ms"] - 1
        print(f"latency: measured {described['latency_ms']:.3f} ms, predicted {predicted:.3f} ms ({error:+.1%}) by "
              f"{config.lut}")  # fmt: skip


def run_demo_command(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(settings_from_args(DemoConfig, args))


def run_report(args: argparse.Namespace) -> None:
    from reports import write_report

    config = settings_from_args(ReportConfig, args)
    report = write_report(config.runs, config.out)
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
    try:
        args = build_parser().parse_args(argv)
    except SettingsFileError as e:  # before the flags are read: there is no --debug yet
        print(f"spvit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
