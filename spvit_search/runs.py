"""Runs: the settings the run commands share, and the lifecycle every run goes through.

A run's settings are its `config.json`; a run is never overwritten, only resumed (an Optuna study: joined by a run
with the same settings). `start_run` and `Run` are the steps a gradient search, an Optuna study and a fine-tune
take alike: devices resolved, run directory checked, process group joined, torch seeded, `config.json` and
`summary.json` written under the run's kind, a training run's trackers (`--log`) started and closed. File names
and kinds are `reports.run_format`'s.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import torch

from finetune.devices import AMP_MODES, resolve_amp, resolve_device
from finetune.distillation import DISTILLATION_TYPES
from finetune.distributed import DistributedContext, init_distributed, shutdown
from reports.run_format import CHECKPOINT, CONFIG, KIND_KEY, SUMMARY
from supernets.architecture import SKIP_MIXERS
from supernets.io import atomic_write_text, remove_stale_temporaries

from .run_lock import RunLock
from .settings import describe_type, group, matches_type
from .tracking import (
    DEFAULT_PROJECT,
    TRACKERS,
    Tracker,
    build_trackers,
    check_trackers,
    closing_trackers,
    write_architecture,
)

RESUME_MODES: dict[str, bool | str] = {"no": False, "yes": True, "auto": "auto"}  # --resume's values

# May differ on resume: how a run shows, where it lives and computes, not what it computes. A run resumed on another
# device continues from its checkpoint, but bit-identical resume is promised on the same device and dtype only.
NOT_SETTINGS = ("progress", "out", "device", "compile", "log_every", "log", "log_project")


def parse_model_kwargs(items: list[str] | dict[str, Any]) -> dict[str, Any]:
    """`k=v` pairs as timm's train.py takes them; values are Python literals where they parse as one. A mapping (a
    config file's) is taken as it is."""
    if isinstance(items, dict):
        return items
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


def _zero_is_off(value: float | None) -> float | None:
    return value or None


model_setting = group("model")
optim_setting = group("optimisation")
distillation_setting = group("distillation")
compute_setting = group("compute")
run_setting = group("run")


@dataclass(kw_only=True)
class ModelSettings:
    model: str = model_setting(help="supernet name, e.g. deit_tiny_patch16_224 (see list_supernets)")
    img_size: int | None = model_setting(None, help="input image size", default_text="the model's")
    num_classes: int | None = model_setting(None, help="classifier classes", default_text="the dataset's")
    model_kwargs: dict[str, Any] = model_setting(
        factory=dict, help="extra timm model arguments, e.g. patch_size=4", metavar="K=V", nargs="*",
        parse=parse_model_kwargs,
    )  # fmt: skip


@dataclass(kw_only=True)
class SearchSpaceSettings:
    skip_mixer: str = model_setting(
        "identity", choices=SKIP_MIXERS,
        help="what a skip block computes: identity (nothing, the residual alone) or affine (RIFormer's per-channel "
        "(s-1)*LN(x)+t, trained with the weights and folded into the norm at export)",
    )  # fmt: skip


@dataclass(kw_only=True)
class WeightsSettings:
    checkpoint: str | None = model_setting(
        None, help="timm-format weights (.safetensors, .pth, .pt)", exclusive="weights", default_text="random init"
    )
    pretrained: bool = model_setting(False, help="timm's pretrained weights (downloads)", exclusive="weights")


@dataclass(kw_only=True)
class OptimSettings:
    epochs: int = optim_setting(10, help="passes over the training set")
    lr: float = optim_setting(2e-4, help="weights learning rate (AdamW, warmup-cosine)")
    weight_decay: float = optim_setting(0.05, help="AdamW weight decay")
    warmup_epochs: int = optim_setting(0, help="epochs of linear learning-rate warmup")
    label_smoothing: float = optim_setting(0.1, help="label smoothing", aliases=("--smoothing",))
    grad_clip: float | None = optim_setting(
        5.0, help="max gradient norm (0: off)", aliases=("--clip-grad",), parse=_zero_is_off
    )


@dataclass(kw_only=True)
class DistillationSettings:
    distillation: str = distillation_setting(
        "none", choices=DISTILLATION_TYPES, aliases=("--distillation-type",),
        help="knowledge distillation from the teacher (search: the dense source model, the supernet as it starts; "
        "finetune: --teacher-model); soft: KL of temperature-scaled outputs; hard: CE on the teacher's top-1 (DeiT)",
    )  # fmt: skip
    distillation_alpha: float = distillation_setting(0.5, help="weight of the distillation term")
    distillation_tau: float = distillation_setting(1.0, help="soft distillation temperature")


@dataclass(kw_only=True)
class ImitationSettings:
    imitation: bool = distillation_setting(
        False,
        help="RIFormer's module imitation from the dense teacher: each pruned block's mixer branch against the "
        "teacher's on the same input, every block's output against the teacher's, and their token relations",
    )
    lambda_out: float = distillation_setting(1e-4, help="imitation: weight of the pruned mixers' term, per sample")
    lambda_in: float = distillation_setting(1e-3, help="imitation: weight of the block outputs' term, per sample")
    lambda_rel: float = distillation_setting(1.0, help="imitation: weight of the token relations' term, per sample")


@dataclass(kw_only=True)
class DeviceSettings:
    device: str = compute_setting(
        "auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
        help="where to compute (auto: CUDA, then MPS, then the CPU; under torchrun cuda is each rank's own GPU)",
    )  # fmt: skip


@dataclass(kw_only=True)
class ComputeSettings(DeviceSettings):
    amp: str = compute_setting(
        "auto", choices=AMP_MODES, shortcuts=(("--bf16", "bf16"),),
        help="mixed precision of the training forwards (auto: bf16 on a CUDA GPU that supports it, else none; fp16 "
        "scales the loss); gates, complexity loss and costs stay float32 or wider",
    )  # fmt: skip
    compile: bool = compute_setting(False, help="torch.compile the model's training forward")


@dataclass(kw_only=True)
class RunSettings:
    out: str = run_setting(required=True, help="run directory")
    seed: int = run_setting(0, help="seed of the initial weights, the data order and the random draws")
    progress: bool = run_setting(
        True, help="tqdm bars while training, drawn on a terminal only (each epoch ends in one printed line either way)"
    )


@dataclass(kw_only=True)
class TrainingRunSettings(RunSettings):
    checkpoint_every: int = run_setting(0, help="optimizer steps between checkpoints (0: at epoch ends only)")
    log_every: int = run_setting(
        50, help="optimizer steps between metrics lines and progress updates (the only points the loop waits for "
        "the device)",
    )  # fmt: skip
    log: list[str] = run_setting(
        factory=list, choices=TRACKERS, metavar="TRACKER",
        help="also send the metrics and the final architecture to these trackers, e.g. --log tensorboard wandb: "
        "tensorboard writes OUT/tensorboard (pip install 'spvit-search[tracking]'); wandb and mlflow need their own "
        "packages installed",
    )  # fmt: skip
    log_project: str = run_setting(DEFAULT_PROJECT, help="the W&B project and MLflow experiment of --log wandb mlflow")


class RunConfig:
    """Base of the run config dataclasses: rebuilt from a saved `config.json`, unknown fields refused."""

    kind: ClassVar[str]  # the run's kind, `reports.run_format`'s
    joinable: ClassVar[bool] = False  # a directory with the same settings is joined (a study), not refused

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} is a JSON object, not {type(data).__name__}")
        data = dict(data)
        kind = data.pop(KIND_KEY, cls.kind)  # config.json written before runs recorded their kind has none
        if kind != cls.kind:
            raise ValueError(f"the config of a {kind!r} run, not of a {cls.kind!r} run")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field '{unknown[0]}'")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if not matches_type(value, hints[name]):
                raise ValueError(
                    f"{name}: expected {describe_type(hints[name])}, got {type(value).__name__} {value!r:.40}"
                )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """What `config.json` holds: the kind, then every setting."""
        return {KIND_KEY: self.kind, **asdict(self)}


RunConfigT = TypeVar("RunConfigT", bound="RunConfig")


def resolve_compute(config: RunConfigT) -> tuple[RunConfigT, torch.device]:
    """`config` with its `device` and `amp` resolved (`auto` becomes what this machine runs: stored so in
    config.json) and the device; an unavailable device is refused before any work."""
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device) if hasattr(config, "amp") else None
    changes = {"device": str(device)} | ({"amp": amp} if amp is not None else {})
    return dataclasses.replace(config, **changes), device


def check_run_directory(out_dir: Path, config: RunConfig, resume: bool) -> bool:
    """Refuse to overwrite a run, or to resume a finished one or one with other settings than `config`; a joinable
    run's directory with the same settings is joined. Whether it was."""
    saved = out_dir / CONFIG
    if config.joinable:
        if not saved.exists():
            return False
        changed = _changed_settings(_saved_config(saved, type(config)), config)
        if changed:
            raise ValueError(f"{out_dir} holds a study with other settings: {', '.join(changed)} differ")
        return True
    if not resume:
        if (out_dir / CHECKPOINT).exists():
            raise ValueError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        return False
    if not (out_dir / CHECKPOINT).exists() or not saved.exists():
        raise FileNotFoundError(f"nothing to resume in {out_dir}: no {CHECKPOINT} and {CONFIG}")
    changed = _changed_settings(_saved_config(saved, type(config)), config)
    if changed:
        raise ValueError(
            f"--resume with other settings than {saved}: {', '.join(changed)} differ; resume with the same settings"
        )
    if (out_dir / SUMMARY).exists():
        raise ValueError(f"{out_dir} holds a finished run ({SUMMARY} is written); there is nothing to resume")
    remove_stale_temporaries(out_dir)  # left by a writer killed mid-write; the files they were for are intact
    return False


def _saved_config(saved: Path, config_type: type[RunConfigT]) -> RunConfigT:
    try:
        return config_type.from_dict(json.loads(saved.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{saved} is not a valid run config: {e}") from None


def _changed_settings(previous: RunConfig, config: RunConfig) -> list[str]:
    return [
        f.name
        for f in fields(config)
        if f.name not in NOT_SETTINGS and getattr(previous, f.name) != getattr(config, f.name)
    ]


@dataclass(frozen=True)
class Run:
    """A started run: its resolved config, directory, device and place in the process group."""

    config: Any  # a RunConfig dataclass, device and amp resolved
    out_dir: Path
    device: torch.device
    context: DistributedContext
    resume: bool
    joined: bool  # the directory held this very study already (joinable runs only)
    trackers: list[Tracker] = dataclasses.field(default_factory=list)  # --log's, on the main process: engine sinks

    def seed_rank(self) -> None:
        """From here on dropout, augmentation and random draws differ per rank (the initial weights did not)."""
        torch.manual_seed(self.config.seed + self.context.rank)

    def write_config(self) -> None:
        """`config.json`, on the main process, and the trackers started; called once the settings have proved to
        work (a budget in range, a dataset that loads), so a refused run leaves no directory behind."""
        if self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / CONFIG, json.dumps(self.config.to_dict(), indent=2) + "\n")
        for tracker in self.trackers:  # W&B and MLflow start their run here: one that cannot, stops this one
            tracker.start()

    def finish(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """`summary.json` (the run's kind, then `summary`), written last; the summary on the main process, None on
        the other ranks."""
        if not self.context.is_main:
            return None
        summary = {KIND_KEY: self.config.kind, **summary}
        atomic_write_text(self.out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        write_architecture(self.trackers, self.out_dir)
        return summary


@contextmanager
def start_run(config: RunConfig, resume: bool | str = False, distributed: bool = True) -> Iterator[Run]:
    """Start a run of `config`: its device resolved, its directory checked, the torchrun process group joined
    (`distributed`) and torch seeded with its seed (the same initial weights on every rank); the process group
    is left when the run ends, however it ends. `resume`: True, False, or "auto" (True where `--out` holds a
    checkpoint)."""
    tracked = isinstance(config, TrainingRunSettings)
    if tracked:
        check_trackers(config.log)
    config, device = resolve_compute(config)
    out_dir = Path(config.out)
    if resume == "auto":  # what a restarted torchrun group runs: continue where a checkpoint is, start otherwise
        resume = (out_dir / CHECKPOINT).exists()
    context = init_distributed(device) if distributed else DistributedContext()
    # The main process is the run's one writer (an Optuna study's directory is shared by its workers on purpose).
    lock = RunLock(out_dir) if context.is_main and not config.joinable else nullcontext()
    trackers = []
    if tracked:
        trackers = build_trackers(config.log, out_dir, config.log_project, config.to_dict(), context, bool(resume))
    try:
        with lock, closing_trackers(trackers):
            joined = check_run_directory(out_dir, config, resume)
            torch.manual_seed(config.seed)
            yield Run(config, out_dir, device, context, resume, joined, trackers)
    finally:
        shutdown(context)
