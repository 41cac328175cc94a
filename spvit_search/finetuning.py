"""Fine-tune an exported subnet with knowledge distillation from the dense model (or another teacher).

A run directory (kind `finetune`) holds `config.json`, `metrics.jsonl`, `checkpoint.safetensors` (resume state),
`best/` and `last/` (subnet directories: `load_subnet`, `timm.create_model("local-dir:DIR")` or `spvit eval
--subnet` read them; their model cards are written with the summary's figures when the run finishes), and at the end
`arch.json` and `summary.json`.

The teacher is, by default, the dense model the subnet was searched from: `spvit export` records it
(timm name, weights file and model arguments) in the subnet's `config.json`, in its lineage (`spvit.source`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.classification import ClassificationTask, evaluate_classifier
from finetune.devices import pin_memory
from finetune.distillation import DistillationLoss
from finetune.engine import Engine, EngineConfig
from finetune.imitation import ImitationWeights, ModuleImitation
from finetune.optim import adamw, weight_decay_groups
from finetune.schedule import warmup_cosine
from lookup_tables.counting import count_macs
from reports.run_format import ARCH, BEST, FINETUNE, LAST
from supernets import GateConfig, Subnet, build_supernet
from supernets.families.vit.subnet import VisionTransformerSubnet
from supernets.registry import create_source_model

from .data import TrainDataConfig, build_datasets, build_loaders, num_classes_of
from .export import (
    Lineage,
    dense_subnet,
    export_subnet,
    load_subnet,
    read_subnet_lineage,
    save_subnet,
    with_affine_skips,
)
from .model_card import finetune_figures, write_model_card
from .runs import (
    ComputeSettings,
    DistillationSettings,
    ImitationSettings,
    OptimSettings,
    Run,
    RunConfig,
    RunSettings,
    SearchSpaceSettings,
    TrainingRunSettings,
    distillation_setting,
    optim_setting,
    start_run,
)
from .settings import group, inherit

INITS = ("subnet", "dense")


subnet_setting = group("subnet")


@dataclass(kw_only=True)
class SubnetSettings:
    subnet: str = subnet_setting(help="subnet directory written by `spvit export`")
    init: str = subnet_setting(
        "subnet", choices=INITS,
        help="start from the subnet's weights (the search's) or from the dense source model's (the paper's choice)",
    )  # fmt: skip


# A dataclass lists its last base's fields first: the bases are the groups in reverse order of the --help.
@dataclass(kw_only=True)
class FinetuneConfig(
    RunConfig, TrainingRunSettings, ComputeSettings, OptimSettings, ImitationSettings, DistillationSettings,
    TrainDataConfig, SubnetSettings,
):  # fmt: skip
    """Every setting of a fine-tuning run; stored as the run's `config.json`."""

    kind: ClassVar[str] = FINETUNE

    out: str = inherit(RunSettings, "out", "runs/finetune")
    distillation: str = inherit(DistillationSettings, "distillation", "soft")
    teacher_model: str | None = distillation_setting(
        None, help="a model name (with --teacher-checkpoint) or a subnet directory",
        default_text="the subnet's dense source model",
    )  # fmt: skip
    teacher_checkpoint: str | None = distillation_setting(
        None, aliases=("--teacher-path",), help="weights of --teacher-model", default_text="none"
    )
    teacher_pretrained: bool = distillation_setting(False, help="timm's pretrained teacher (downloads)")
    epochs: int = inherit(OptimSettings, "epochs", 30)
    lr: float = inherit(OptimSettings, "lr", 5e-4, help="AdamW learning rate, warmup then cosine")
    warmup_epochs: int = inherit(OptimSettings, "warmup_epochs", 1)
    model_ema: bool = optim_setting(False, help="keep an EMA of the weights; evaluate and save it")
    model_ema_decay: float = optim_setting(0.9998, help="decay of the weights' EMA")
    skip_mixer: str | None = inherit(
        SearchSpaceSettings, "skip_mixer", None, group="subnet", default_text="the subnet's",
        help="affine: make the subnet's identity skip blocks affine skips at s = 1, t = 0 (the same function), "
        "whose norm then trains",
    )  # fmt: skip


class DistillationTask(ClassificationTask):
    """The student's loss against the labels and the teacher's logits, and the module-imitation terms when given;
    saves best/last as subnet dirs, recording `lineage`."""

    def __init__(
        self,
        teacher: nn.Module | None,
        loss: DistillationLoss,
        val_loader: DataLoader,
        out_dir: Path,
        lineage: Lineage | None,
        imitation: ModuleImitation | None = None,
    ) -> None:
        super().__init__(val_loader, loss, teacher)
        self.out_dir = out_dir
        self.lineage = lineage
        self.imitation = imitation

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        loss, metrics = super().training_step(model, batch)
        if self.imitation is None:
            return loss, metrics
        terms = self.imitation.losses()
        return loss + terms["imitation"], metrics | {k: v.detach() for k, v in terms.items()}

    def save_model(self, model: nn.Module, name: str) -> None:
        save_subnet(model, self.out_dir / name, self.lineage)


def run_finetune(config: FinetuneConfig, resume: bool | str = False) -> dict[str, Any] | None:
    """Fine-tune `config.subnet`; returns the run's summary (also `summary.json`) on the main process, None on
    the other DDP ranks."""
    _check_config(config)
    with start_run(config, resume) as run:
        return _finetune(run)


def _finetune(run: Run) -> dict[str, Any] | None:
    config: FinetuneConfig = run.config
    student = load_subnet(config.subnet)
    lineage = dataclasses.replace(read_subnet_lineage(config.subnet), finetune_run=str(run.out_dir.resolve()))
    source = lineage.source
    if config.init == "dense":
        student = _subnet_from_dense(student, source, config.subnet)
    if config.skip_mixer == "affine":
        student = with_affine_skips(student)
    elif config.skip_mixer == "identity" and student.arch.skip_mixer == "affine":
        raise ValueError(
            "--skip-mixer identity: the subnet's skip blocks are affine skips, which would lose what they compute; "
            "export the run again with --skip-mixer identity"
        )
    arch = student.arch
    train_set, val_set = build_datasets(config, arch.img_size, config.augment)
    if num_classes_of(train_set) != arch.num_classes:
        raise ValueError(
            f"the subnet has {arch.num_classes} classes but the dataset '{config.data}' {num_classes_of(train_set)}"
        )
    student.to(run.device)
    teacher = None
    if config.distillation != "none" or config.imitation:
        teacher = build_teacher(config, student, source).to(run.device)
    train_loader, val_loader = build_loaders(
        config, train_set, val_set, config.seed, run.context.enabled, pin_memory(run.device)
    )
    teacher_metrics = evaluate_classifier(teacher, val_loader) if teacher is not None else None
    run.write_config()
    if run.context.is_main:
        arch.save(run.out_dir / ARCH)

    run.seed_rank()
    student.train()
    optimizer = adamw(weight_decay_groups(student, config.weight_decay), lr=config.lr)
    steps = config.epochs * len(train_loader)
    scheduler = warmup_cosine(optimizer, steps, config.warmup_epochs * len(train_loader))
    loss = DistillationLoss(
        config.distillation, config.distillation_alpha, config.distillation_tau, config.label_smoothing
    )
    imitation = None
    if config.imitation:
        weights = ImitationWeights(config.lambda_out, config.lambda_in, config.lambda_rel)
        imitation = ModuleImitation(student.blocks, teacher.blocks, lambda i: arch.blocks[i].mixer != "msa", weights)
    task = DistillationTask(teacher, loss, val_loader, run.out_dir, lineage, imitation)
    engine = Engine(
        student, task, {"weights": optimizer}, {"weights": scheduler}, train_loader,
        EngineConfig(
            run.out_dir, config.epochs, config.grad_clip, config.checkpoint_every, log_every=config.log_every,
            progress=config.progress, device=run.device, amp=config.amp, compile=config.compile,
            ema_decay=config.model_ema_decay if config.model_ema else None, best_metric="acc1",
        ),
        run.context, run.trackers,
    )  # fmt: skip
    if run.resume:
        engine.resume(finished_ok=True)  # check_run_directory refused runs whose outputs are all written
    metrics = engine.fit()
    if not run.context.is_main:
        return None
    summary = _summary(engine, metrics, teacher_metrics, config, source)
    for name in (BEST, LAST):  # before summary.json, which is written last
        write_model_card(run.out_dir / name, engine.eval_model, lineage, finetune_figures(summary, name))
    return run.finish(summary)


def build_teacher(config: FinetuneConfig, student: VisionTransformerSubnet, source: dict[str, Any] | None) -> nn.Module:
    """The teacher in eval mode with gradients off: `--teacher-model` (a model name or a subnet directory),
    else the dense model the subnet came from."""
    arch = student.arch
    name = config.teacher_model
    if name is not None and Path(name).is_dir():
        teacher = load_subnet(name)
    elif name is not None:
        teacher = create_source_model(
            name, config.teacher_pretrained, config.teacher_checkpoint, arch.img_size, arch.num_classes
        )
    else:
        kwargs = _dense_source(source, config.subnet, "distil from it")
        teacher = create_source_model(**kwargs)
    classes = teacher.num_classes if hasattr(teacher, "num_classes") else None
    if classes is not None and classes != arch.num_classes:
        raise ValueError(f"the teacher has {classes} classes, the subnet {arch.num_classes}")
    if config.imitation:
        teacher = _imitation_teacher(teacher, student, name or source["model"], {} if name else source["model_kwargs"])
    return teacher.eval().requires_grad_(False)


def _imitation_teacher(teacher: nn.Module, student: nn.Module, name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """The teacher as our own modules, whose blocks align with the student's: a subnet directory's as it is, a timm
    model's dense export. Its blocks must be as many and as wide as the student's."""
    if not isinstance(teacher, Subnet):
        teacher = dense_subnet(teacher, name, model_kwargs)
    if len(teacher.blocks) < len(student.blocks):
        raise ValueError(
            f"--imitation: the teacher has {len(teacher.blocks)} blocks, the subnet {len(student.blocks)}; imitation "
            "pairs them one to one"
        )
    width, teacher_width = (m.blocks[0].norm2.weight.shape[0] for m in (student, teacher))
    if width != teacher_width:
        raise ValueError(
            f"--imitation: the subnet's blocks are {width} wide, the teacher's {teacher_width}; imitation projects "
            "nothing, so a subnet of reduced width cannot imitate its dense model"
        )
    return teacher


def _dense_source(source: dict[str, Any] | None, subnet_dir: str, purpose: str) -> dict[str, Any]:
    """`create_source_model` arguments of the dense model a subnet was exported from."""
    if source is None:
        raise ValueError(
            f"{subnet_dir} does not record the dense model it came from (it was not written by `spvit export`); "
            f"pass --teacher-model to {purpose}"
        )
    return {
        "name": source["model"],
        "pretrained": source["pretrained"],
        "checkpoint_path": source["checkpoint"],
        "img_size": source["img_size"],
        "num_classes": source["num_classes"],
        **source["model_kwargs"],
    }


def _subnet_from_dense(student: VisionTransformerSubnet, source: dict[str, Any] | None, subnet_dir: str) -> nn.Module:
    """The subnet's architecture exported from a supernet converted from the dense source weights."""
    kwargs = _dense_source(source, subnet_dir, "start from dense weights (or use --init subnet)")
    # The dense model has no affine skips: an affine subnet's start at s = 1, t = 0, the identity.
    net = build_supernet(kwargs.pop("name"), gates=GateConfig(skip_mixer=student.arch.skip_mixer), **kwargs)
    return export_subnet(net, student.arch, fold_bn=student.bn_folded)


def _summary(
    engine: Engine,
    metrics: dict[str, float],
    teacher_metrics: dict[str, float] | None,
    config: FinetuneConfig,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    model = engine.eval_model
    arch = model.arch
    image = torch.zeros(1, 3, arch.img_size, arch.img_size)
    dense = create_source_model(**_dense_source(source, config.subnet, "")) if source else None
    return {
        "model": arch.model,
        "macs": count_macs(model.eval(), image),
        "params": sum(p.numel() for p in model.parameters()),
        "dense_macs": count_macs(dense.eval(), image) if dense is not None else None,
        "dense_params": sum(p.numel() for p in dense.parameters()) if dense is not None else None,
        "val_acc1": metrics["acc1"],
        "val_acc5": metrics["acc5"],
        "best_val_acc1": engine.best,
        "teacher_val_acc1": teacher_metrics["acc1"] if teacher_metrics else None,
        "dense_val_acc1": teacher_metrics["acc1"] if teacher_metrics and config.teacher_model is None else None,
        "distillation": config.distillation,
        "epochs": engine.epoch,
        "steps": engine.step,
    }


def _check_config(config: FinetuneConfig) -> None:
    if config.init not in INITS:
        raise ValueError(f"--init '{config.init}' is not one of {', '.join(INITS)}")
    for name in ("epochs", "log_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    DistillationLoss(config.distillation, config.distillation_alpha, config.distillation_tau)  # checks the values
    if config.teacher_checkpoint is not None and config.teacher_model is None:
        raise ValueError("--teacher-checkpoint needs --teacher-model, the timm name its weights are for")
