"""The search: train the supernet's gates (and weights) so its architecture lands on a FLOPs budget.

A run directory (kind `search`) holds `config.json`, `lut.csv`, `metrics.jsonl`, `arch_epoch{N}.json` after every
epoch, `checkpoint.safetensors` (resume state), and at the end `arch.json`, `supernet.safetensors` and
`summary.json`; with `--log`, the trackers' files too (`tracking`).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.checkpoint import save_checkpoint
from finetune.classification import ClassificationTask, evaluate_classifier
from finetune.devices import pin_memory
from finetune.distillation import DistillationLoss
from finetune.distributed import DistributedContext, gather_objects
from finetune.engine import Engine, EngineConfig
from finetune.imitation import ImitationWeights, ModuleImitation
from finetune.optim import GATE_OPTIMIZERS, adamw, gate_optimizer, weight_decay_groups
from finetune.schedule import warmup_cosine
from lookup_tables import CONVENTIONS, LookupTable, build_lookup_table, differentiable_flops
from reports.run_format import ARCH, LUT, SEARCH, SUPERNET, epoch_arch
from supernets import MIXERS, Architecture, GateConfig, Supernet, build_supernet
from supernets.layers.gates import GATE_INITS
from supernets.layers.unified_attention import mixer_index

from .complexity import ComplexityLoss, budget_metric, check_budget, parse_budget, relative_budget
from .data import TrainDataConfig, build_datasets, build_loaders, num_classes_of
from .discrete_spaces import unit_magnitude
from .metric import MEASURED_TOLERANCE, METRICS, LatencyMetric, MacsMetric, cost_metric, latency_meter
from .runs import (
    ComputeSettings,
    DistillationSettings,
    ImitationSettings,
    ModelSettings,
    OptimSettings,
    Run,
    RunConfig,
    RunSettings,
    SearchSpaceSettings,
    TrainingRunSettings,
    WeightsSettings,
    optim_setting,
    start_run,
)
from .settings import group, inherit

budget_setting = group("budget and complexity loss")


@dataclass(kw_only=True)
class BudgetSettings:
    """The budget and its cost model, of the gradient search and the Optuna study alike."""

    target: str = budget_setting(
        "0.6x",
        required=True,
        help="budget: MACs (3.2G, 3200M), milliseconds (12ms: --metric latency), or 0.6x of dense",
    )
    metric: str = budget_setting(
        "macs", choices=METRICS,
        help="what the budget counts: MACs, or the ms a latency table predicts (--lut from `spvit lut --latency`)",
    )  # fmt: skip
    convention: str = budget_setting("fvcore", choices=CONVENTIONS, help="how MACs count")
    lut: str | None = budget_setting(
        None, help="lookup table CSV from `spvit lut`", default_text="built here, on the CPU"
    )


# A dataclass lists its last base's fields first: the bases are the groups in reverse order of the --help.
@dataclass(kw_only=True)
class SearchConfig(
    RunConfig, TrainingRunSettings, ComputeSettings, ImitationSettings, DistillationSettings, OptimSettings,
    BudgetSettings, TrainDataConfig, WeightsSettings, SearchSpaceSettings, ModelSettings,
):  # fmt: skip
    """Every setting of a search run; stored as the run's `config.json`."""

    kind: ClassVar[str] = SEARCH

    out: str = inherit(RunSettings, "out", "runs/search")
    complexity_loss: str = budget_setting(
        "auto", choices=("auto", "normalized", "paper"),
        help="auto: normalized loss with λ by dual ascent; paper: λ·(T-F)² in GMACs",
    )  # fmt: skip
    lam: float = budget_setting(1.0, help="λ (the starting value for auto)")
    lambda_lr: float = budget_setting(0.02, help="auto: log-λ step per optimizer step")
    estimator: str = budget_setting("threshold", choices=("threshold", "expected"), help="MACs of the gates")
    tolerance: float = budget_setting(0.01, help="relative distance to the target that is on target")
    patience: int = budget_setting(3, help="stop after this many on-target epochs in a row")
    project: bool = budget_setting(True, help="finally flip the least confident gates to meet the budget exactly")
    measure_latency: bool = budget_setting(
        True,
        help=f"--metric latency: time the projected subnet here, and project again until it is within "
        f"{MEASURED_TOLERANCE:.0%} of the budget (where this process runs in the table's device, batch, dtype and "
        "threads)",
    )
    gate_lr: float = optim_setting(0.02, help="gate logits learning rate (AdamW, no decay)")
    gate_optimizer: str = optim_setting(
        "adam", choices=GATE_OPTIMIZERS,
        help="adam: one second moment per gate; shared_adam: one for all gates (steps follow the mean gradients)",
    )  # fmt: skip
    gate_init: float = optim_setting(1.5, help="initial gate logit")
    gate_init_from: str = optim_setting(
        "constant", choices=GATE_INITS,
        help="constant: every logit --gate-init; magnitude: MLP logits spread by magnitude rank, mean --gate-init",
    )  # fmt: skip
    gate_temperature: float = optim_setting(1.0, help="binary-concrete temperature")
    head_mix_temperature: float = optim_setting(0.01, help="softmax temperature of z")
    sync_gates: bool = optim_setting(False, help="DDP: the same gate draws on every rank instead of one per rank")


class SearchTask(ClassificationTask):
    """One search step: the classification loss (distilled from the dense supernet) plus the complexity loss of the
    gates' cost in the budget's metric (MACs, or predicted ms)."""

    def __init__(
        self,
        net: Supernet,
        lut: LookupTable,
        metric: MacsMetric | LatencyMetric,
        complexity: ComplexityLoss,
        val_loader: DataLoader,
        config: SearchConfig,
        out_dir: Path,
        context: DistributedContext,
        gate_generator: torch.Generator,
    ) -> None:
        loss = DistillationLoss(
            config.distillation, config.distillation_alpha, config.distillation_tau, config.label_smoothing
        )
        teacher = dense_teacher(net) if config.distillation != "none" or config.imitation else None
        super().__init__(val_loader, loss, teacher)
        self.imitation = None
        if config.imitation:  # a regulariser of the conv and skip candidates a step draws
            weights = ImitationWeights(config.lambda_out, config.lambda_in, config.lambda_rel)
            self.imitation = ModuleImitation(net.blocks, teacher.blocks, self._drew_pruned_mixer, weights)
        self.net = net
        self.lut = lut
        self.metric = metric
        self.cost_key = "macs" if metric.name == "macs" else "latency_ms"  # the metrics entry the budget counts
        self.complexity = complexity
        self.config = config
        self.out_dir = out_dir
        self.context = context
        self.gate_generator = gate_generator
        self.on_target_streak = 0

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        loss, metrics = super().training_step(model, batch)
        if self.imitation is not None:
            terms = self.imitation.losses()
            loss = loss + terms["imitation"]
            metrics |= {k: v.detach() for k, v in terms.items()}
        flops = differentiable_flops(self.net, self.lut, self.config.estimator)  # float64, outside autocast's reach
        cost = flops if self.metric.name == "macs" else self.metric.differentiable(self.net, self.config.estimator)
        complexity = self.complexity(cost)
        metrics |= {
            "complexity": complexity.detach(),
            "macs": flops.detach(),
            self.cost_key: cost.detach(),
            f"target_{self.cost_key}": float(self.complexity.target),
        }
        return loss + complexity.to(loss.dtype), metrics

    def _drew_pruned_mixer(self, index: int) -> bool:
        """Whether block `index`'s forward under way computes a conv or a skip (the drawn mixer, or the fixed one)."""
        attn = self.net.blocks[index].attn
        mixer = attn.drawn[1] if attn.drawn is not None else attn.chosen_mixer()
        return mixer != "msa"

    def after_step(self, metrics: dict[str, torch.Tensor | float]) -> None:
        self.complexity.update(metrics[self.cost_key])

    def state_metrics(self) -> dict[str, torch.Tensor | float]:
        return {"lambda": self.complexity.lam, **gate_statistics(self.net)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        arch = self.net.architecture()
        # Fixed for the pass over the val set: the gates are read once, not per block and batch.
        self.net.fix_architecture(arch)
        try:
            metrics = super().evaluate(model)
        finally:
            self.net.release_architecture()
        metrics["macs"] = float(self.lut.flops(arch))
        metrics[self.cost_key] = self.metric.of(arch)
        metrics["params"] = float(self.lut.params(arch))
        return metrics

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        if self.context.is_main:
            self.net.architecture().save(self.out_dir / epoch_arch(epoch + 1))
        on_target = abs(self.complexity.relative_error(metrics[self.cost_key])) <= self.config.tolerance
        self.on_target_streak = self.on_target_streak + 1 if on_target else 0
        return self.on_target_streak >= self.config.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "lam": float(self.complexity.lam),
            "on_target_streak": self.on_target_streak,
            "gate_generator": self.gate_generator.get_state(),
            "gate_generator_device": self.gate_generator.device.type,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.complexity.lam = state["lam"]
        self.on_target_streak = state["on_target_streak"]
        # A generator's state fits only a generator of the same kind of device: resumed elsewhere, the gate draws
        # continue from this run's seed instead.
        if state.get("gate_generator_device", "cpu") == self.gate_generator.device.type:
            self.gate_generator.set_state(state["gate_generator"])


def dense_teacher(net: Supernet) -> Supernet:
    """A frozen copy of the supernet as it starts, fixed to the dense architecture: the dense source model, on the
    supernet's device, for distillation during the search."""
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    teacher.fix_architecture(teacher.dense_architecture())
    return teacher


def init_gates_from_magnitude(net: Supernet, init: float) -> None:
    """Each block's MLP gate logits spread over (0, 2·init] by the units' weight-magnitude rank within the block,
    mean ≈ init: the weakest units start nearest to being cut, and the dense model is still what the gates draw."""
    with torch.no_grad():
        for block in net.blocks:
            magnitude = unit_magnitude(block.mlp)
            rank = magnitude.argsort().argsort().to(block.mlp.gates.logits.dtype)  # 0: weakest
            block.mlp.gates.logits.copy_(2 * init * (rank + 1) / len(rank))


def gate_statistics(net: Supernet) -> dict[str, torch.Tensor]:
    """How many MLP units are kept, how confident the gates are, and how many blocks use each mixer, as device
    tensors (read at log points with the step metrics)."""
    mlp_logits = torch.cat([b.mlp.gates.logits.detach() for b in net.blocks])
    attn_logits = torch.stack([b.attn.gates.logits.detach() for b in net.blocks])  # (depth, 3)
    mixers = mixer_index(attn_logits > 0)  # (depth,)
    counts = torch.bincount(mixers, minlength=len(MIXERS))
    stats = {
        "mlp_kept": (mlp_logits > 0).float().mean(),
        "mlp_gate_prob": torch.sigmoid(mlp_logits).mean(),
        **{f"blocks_{m}": counts[i] for i, m in enumerate(MIXERS)},
    }
    # Per block, the probability of each cumulative attention gate and the mean MLP gate probability:
    # `gate.{i}.msa` is P(the msa gate is on), the reports draw these as trajectories.
    attn_probs = attn_logits.sigmoid()
    for i, block in enumerate(net.blocks):
        stats.update({f"gate.{i}.{m}": attn_probs[i, j] for j, m in enumerate(MIXERS[1:])})
        stats[f"gate.{i}.mlp"] = block.mlp.gates.logits.detach().sigmoid().mean()
    return stats


def run_search(config: SearchConfig, resume: bool | str = False) -> dict[str, Any] | None:
    """Search under `config.target`; returns the run's summary (also written as `summary.json`) on the main
    process, None on the other DDP ranks."""
    _check_config(config)
    with start_run(config, resume) as run:
        return _search(run)


def _search(run: Run) -> dict[str, Any] | None:
    config: SearchConfig = run.config
    img_size = img_size_of(config.model, config.img_size)
    train_set, val_set = build_datasets(config, img_size, config.augment)
    num_classes = check_num_classes(config.num_classes, num_classes_of(train_set))
    net = build_supernet(
        config.model,
        pretrained=config.pretrained,
        checkpoint_path=config.checkpoint,
        img_size=config.img_size,
        num_classes=num_classes,
        gates=GateConfig(config.gate_init, config.gate_temperature, config.head_mix_temperature, config.skip_mixer),
        **config.model_kwargs,
    )
    if config.gate_init_from == "magnitude":
        init_gates_from_magnitude(net, config.gate_init)
    lut = lookup_table(net, config.convention, config.lut)  # counted on the CPU, before the move
    metric = cost_metric(lut, budget_metric(config.target, config.metric))
    target = parse_budget(config.target, metric.dense(), metric.name)
    # The gates choose at full depth and width.
    check_budget(target, metric.range(full_size=True), config.target, metric.number, metric.unit)
    run.write_config()
    if run.context.is_main:
        lut.save(run.out_dir / LUT)

    net.to(run.device)
    run.seed_rank()
    gate_seed = config.seed + (0 if config.sync_gates else run.context.rank)
    gate_generator = torch.Generator(device=run.device).manual_seed(gate_seed)
    net.set_gate_generator(gate_generator)
    train_loader, val_loader = build_loaders(
        config, train_set, val_set, config.seed, run.context.enabled, pin_memory(run.device)
    )

    gates = net.gate_parameters()
    optimizers = {
        "weights": adamw(weight_decay_groups(net, config.weight_decay, exclude=gates), lr=config.lr),
        "gates": gate_optimizer(config.gate_optimizer, gates, config.gate_lr),
    }
    steps = config.epochs * len(train_loader)
    schedulers = {"weights": warmup_cosine(optimizers["weights"], steps, config.warmup_epochs * len(train_loader))}
    complexity = ComplexityLoss(target, config.complexity_loss, config.lam, config.lambda_lr, config.tolerance)
    task = SearchTask(net, lut, metric, complexity, val_loader, config, run.out_dir, run.context, gate_generator)
    engine = Engine(
        net, task, optimizers, schedulers, train_loader,
        EngineConfig(
            run.out_dir, config.epochs, config.grad_clip, config.checkpoint_every, log_every=config.log_every,
            progress=config.progress, device=run.device, amp=config.amp, compile=config.compile,
            find_unused_parameters=True,  # the candidates a step did not sample get no gradient
        ),
        run.context, run.trackers,
    )  # fmt: skip
    if run.resume:
        engine.resume(finished_ok=True)  # check_run_directory refused runs whose outputs are all written
    engine.fit()
    return _finish(net, lut, metric, target, val_loader, run, engine)


def _finish(
    net: Supernet,
    lut: LookupTable,
    metric: MacsMetric | LatencyMetric,
    target: float,
    val_loader: DataLoader,
    run: Run,
    engine: Engine,
) -> dict[str, Any] | None:
    config: SearchConfig = run.config
    searched = net.architecture()
    arch, measured = searched, {}
    if config.project and metric.name == "latency" and config.measure_latency:
        arch, measured = _project_measured(net, lut, metric, target, config.target, run)
    elif config.project:
        arch = metric.project(net, target)
    net.eval()
    net.fix_architecture(arch)
    metrics = evaluate_classifier(net, val_loader)
    net.release_architecture()
    dense = lut.dense_flops()
    summary = {
        "model": config.model,
        "metric": metric.name,
        **({"target_macs": target} if metric.name == "macs" else {"target_latency_ms": target}),
        "macs": lut.flops(arch),
        "macs_before_projection": lut.flops(searched),
        "dense_macs": dense,
        "params": lut.params(arch),
        "dense_params": lut.params(net.dense_architecture()),
        "val_acc1": metrics["acc1"],
        "val_acc5": metrics["acc5"],
        "epochs": engine.epoch,
        "steps": engine.step,
        "mixers": {m: arch.mixers.count(m) for m in MIXERS},
        "mlp_kept": sum(len(b.mlp_kept) for b in arch.blocks) / sum(net.mlp_hidden),
        "lambda": float(engine.task.complexity.lam),
    }
    if metric.name == "latency":
        summary |= {"latency_ms": metric.of(arch), "latency_ms_before_projection": metric.of(searched),
                    "dense_latency_ms": metric.dense()}  # fmt: skip
    summary |= measured
    if run.context.is_main:
        arch.save(run.out_dir / ARCH)
        save_checkpoint(run.out_dir / SUPERNET, net.state_dict(), {"config": net.config()})
    return run.finish(summary)


def _project_measured(
    net: Supernet, lut: LookupTable, metric: LatencyMetric, target: float, budget: str, run: Run
) -> tuple[Architecture, dict[str, Any]]:
    """The latency projection checked by timing the subnets on rank 0 (the others wait for its figures), and the
    summary's record of it; the table's projection alone, with a warning, where this process is not in the table's
    context."""
    try:
        measure = latency_meter(net, lut, run.device, relative_budget(budget))
        reason = None
    except ValueError as error:
        reason = str(error)
    reason = gather_objects(run.context, reason)[0]  # rank 0's verdict, for every rank
    if reason is not None:
        if run.context.is_main:
            print(f"spvit: warning: the subnet's latency is predicted, not measured: {reason}", file=sys.stderr)
        return metric.project(net, target), {}

    def measure_on_main(arch: Architecture) -> float:
        return gather_objects(run.context, measure(arch) if run.context.is_main else None)[0]

    arch, measured, rounds = metric.project_measured(net, target, measure_on_main)
    return arch, {"measured_latency_ms": measured, "latency_projections": rounds}


def _check_config(config: SearchConfig) -> None:
    for name in ("epochs", "patience", "log_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be 0 (epoch ends only) or positive, got {config.checkpoint_every}")
    if config.gate_init_from not in GATE_INITS:
        raise ValueError(f"--gate-init-from must be one of {', '.join(GATE_INITS)}, got {config.gate_init_from!r}")
    if config.gate_optimizer not in GATE_OPTIMIZERS:
        raise ValueError(f"--gate-optimizer must be one of {', '.join(GATE_OPTIMIZERS)}, got {config.gate_optimizer!r}")
    if not config.tolerance > 0:
        raise ValueError(f"--tolerance must be positive, got {config.tolerance}")


def img_size_of(model: str, img_size: int | None) -> int:
    """`img_size`, or the model's default input size."""
    if img_size is not None:
        return img_size
    from timm.models import get_pretrained_cfg_value

    size = get_pretrained_cfg_value(model, "input_size")
    return size[-1] if size else 224


def check_num_classes(num_classes: int | None, dataset_classes: int) -> int:
    """The dataset's class count, which `--num-classes`, when given, must equal."""
    if num_classes is not None and num_classes != dataset_classes:
        raise ValueError(f"--num-classes {num_classes} does not match the dataset's {dataset_classes} classes")
    return dataset_classes


def lookup_table(net: Supernet, convention: str, path: str | None) -> LookupTable:
    """The table saved at `path` (checked against `net`), or one built now."""
    if path is None:
        return build_lookup_table(net, convention)
    lut = LookupTable.load(path)
    lut.check_supernet(net)
    return lut
