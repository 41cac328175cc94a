"""The one training loop, shared by search and fine-tuning.

A `Task` says what a step computes and what an epoch's end decides; the `Engine` owns everything else:
the device, optimizers and schedules, DDP, gradient clipping, mixed precision (bf16 autocast, or fp16 with a
GradScaler), torch.compile, the weights' EMA, checkpoint/resume, best and last models, `metrics.jsonl` (and the
other metrics sinks a caller adds, e.g. TensorBoard) and progress (`finetune.progress`).
The hot loop never waits for the device: a step's metrics stay device tensors, summed on the device and read
back once every `log_every` steps, at checkpoints and at an epoch's end; the non-finite-loss check is read there
too, always before anything is saved, so a checkpoint never holds weights a NaN reached.
Resuming from a checkpoint continues bit-identically: the data order depends only on (seed, epoch),
the global RNG states are saved, and a resumed epoch restarts at the first batch not yet trained.
(Loader workers seed each sample's augmentation from (seed, epoch, index), so that holds with workers too.)
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from supernets.io import atomic_write_text

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .devices import accumulation_dtype, autocast, to_device
from .distributed import DistributedContext, barrier, gather_objects
from .ema import ModelEma
from .progress import EpochProgress

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was written."""


class Task:
    """What a training step computes and what an epoch's end decides. The defaults keep no state, never stop
    early and do nothing after a step; a task defines `training_step` and `evaluate`, and `save_model` when the
    engine keeps best and last models."""

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Loss of one batch (already on the device) and the metrics to log for it, as device tensors (never read
        them on the host: that would stall the device every step); `model` may be wrapped in DDP or compiled."""
        raise NotImplementedError

    def after_step(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """Called after the optimizers stepped (e.g. to update a Lagrange multiplier)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics of the unwrapped model, which is in eval mode."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Act on an epoch's validation metrics; True stops training early."""
        return False

    def save_model(self, model: nn.Module, name: str) -> None:
        """Write the evaluated model as `name` ("best" or "last"); called only with `best_metric` set."""
        raise NotImplementedError(f"{type(self).__name__} does not save models; leave best_metric unset")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    # Optional: `state_metrics() -> dict[str, torch.Tensor | float]`, the task's state (e.g. λ, gate probabilities)
    # logged as it is at every log point, rather than averaged over the steps like the step metrics.


@dataclass
class EngineConfig:
    out_dir: Path
    epochs: int
    grad_clip: float | None = None  # max gradient norm, None for no clipping
    checkpoint_every: int = 0  # optimizer steps between checkpoints; epoch ends always write one
    log_every: int = 50  # optimizer steps between metrics.jsonl lines (means over the steps); epoch ends write one
    progress: bool = True  # tqdm bars on the main process when it writes to a terminal (epoch lines either way)
    find_unused_parameters: bool = False  # DDP: some parameters may get no gradient in a step (single-path search)
    device: torch.device = torch.device("cpu")
    amp: str = "none"  # none | bf16 | fp16: the training forwards' autocast dtype; evaluation stays float32
    compile: bool = False  # torch.compile the training forward
    ema_decay: float | None = None  # keep an EMA of the weights; it is the model evaluated and saved
    best_metric: str | None = None  # validation metric (higher is better) that picks the "best" saved model


class StepMetrics:
    """Sums of the step metrics since the last log point, kept on the device, and the first step whose loss was
    not finite; `read` takes them to the host in one transfer."""

    def __init__(self, device: torch.device) -> None:
        self.dtype = accumulation_dtype(device)
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}  # plain numbers (learning rates): their value at the last step
        self.steps = 0
        self.first_non_finite = torch.tensor(-1, device=device)

    def add(self, step: int, loss: torch.Tensor, metrics: dict[str, torch.Tensor | float]) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_non_finite = torch.where(bad & (self.first_non_finite < 0), step, self.first_non_finite)
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(self.dtype)
                self.sums[name] = self.sums[name] + value if name in self.sums else value
            else:
                self.last[name] = value
        self.steps += 1

    def read(self, state: dict[str, torch.Tensor | float]) -> tuple[int, dict[str, float]]:
        """(the first non-finite step or -1, the means of the step metrics and the values of `state`), read at once;
        the sums restart."""
        names = list(self.sums)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        values = [self.first_non_finite.to(self.dtype)]
        values += [self.sums[k] / max(self.steps, 1) for k in names]
        values += [v.detach().to(self.device, self.dtype) for v in tensors.values()]
        first, *numbers = torch.stack(values).tolist()
        record = dict(zip([*names, *tensors], numbers, strict=True))
        record.update(self.last)
        record.update({k: float(v) for k, v in state.items() if k not in tensors})
        self.sums, self.last, self.steps = {}, {}, 0
        return int(first), record


class MetricsSink(Protocol):
    """Where the engine's metrics records go: `{"step", "epoch", metric: number, ...}`, a log interval's means (and
    the task's state) or an epoch's validation metrics."""

    def write(self, record: dict[str, Any]) -> None: ...

    def truncate_after(self, step: int) -> None:
        """Called on resume, before any write: drop what was logged after the checkpoint's `step`."""


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))  # a kill here must not lose the log

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = memoryview((json.dumps(record) + "\n").encode())
        with self.path.open("ab", buffering=0) as f:  # unbuffered: nothing is left to flush after a failure
            size = os.fstat(f.fileno()).st_size
            try:
                while line:
                    line = line[f.write(line) :]
            except OSError as e:  # e.g. a full disk: take back the part of the line that was written
                f.truncate(size)
                if e.filename is None:
                    e.filename = str(self.path)
                raise


class Engine:
    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizers: dict[str, Optimizer],
        schedulers: dict[str, LRScheduler],
        train_loader: DataLoader,
        config: EngineConfig,
        context: DistributedContext | None = None,
        sinks: Sequence[MetricsSink] = (),
    ) -> None:
        """`sinks`: where the metrics go besides `metrics.jsonl` (the main process's; the others log nothing)."""
        self.device = config.device
        self.model = model.to(self.device)  # the same parameters: optimizers built before still hold them
        self.task = task
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.train_loader = train_loader
        self.config = config
        self.context = context or DistributedContext()
        self.checkpoint_path = Path(config.out_dir) / CHECKPOINT
        if self.context.is_main:
            Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        self.sinks: list[MetricsSink] = [MetricsLog(Path(config.out_dir) / METRICS, self.context.is_main), *sinks]
        self.epoch = 0
        self.batches_done = 0  # batches of `epoch` already trained
        self.step = 0
        self.finished = False
        self.best: float | None = None  # the best `best_metric` so far
        self.ema = ModelEma(model, config.ema_decay) if config.ema_decay else None
        self._pending_rng: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        self.progress = EpochProgress(config.epochs, show=self.context.is_main, bars=config.progress)
        self._loader_seed = train_loader.generator.initial_seed() if train_loader.generator is not None else 0
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        self.metrics = StepMetrics(self.device)
        forward_model: nn.Module = model
        if self.context.enabled:
            forward_model = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
        self.forward_model = torch.compile(forward_model) if config.compile else forward_model

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, in_step: bool = True) -> None:
        """Write the checkpoint. `in_step`: every rank saves at this step together, so the checkpoint keeps each
        rank's RNGs and task state (each draws its own dropout, augmentation and gates) and the ranks wait for it
        to be whole; a save on a signal, which each rank sees at its own step, keeps rank 0's alone."""
        self._log_interval()  # a checkpoint's step closes a log interval, and nothing non-finite may be saved
        own = {"rng": rng_state(self.device), "task": self.task.state_dict()}  # a rank's own draws (e.g. its gates)
        ranks = gather_objects(self.context, own) if in_step else [own]
        if not self.context.is_main:
            if in_step:
                barrier(self.context)  # a restarted group resumes from this checkpoint only once it is whole
            return
        state = {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "finished": self.finished,
            "best": self.best,
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "rng": own["rng"],
            "rng_by_rank": [r["rng"] for r in ranks] if len(ranks) == self.context.world_size else None,
            "task_by_rank": [r["task"] for r in ranks] if len(ranks) == self.context.world_size else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "task": own["task"],
        }
        save_checkpoint(self.checkpoint_path, self.model.state_dict(), state)
        if in_step:
            barrier(self.context)

    def resume(self, finished_ok: bool = False) -> None:
        """Restore everything from the run directory's checkpoint.

        The checkpoint of a finished training is refused unless `finished_ok`: then `fit` trains no more and
        only evaluates, so that a caller killed after training can still write its final outputs.
        """
        model_state, state = load_checkpoint(self.checkpoint_path)
        if not isinstance(state, dict) or state.get("finished") and not finished_ok:
            if isinstance(state, dict):
                raise ValueError(f"{self.config.out_dir} holds a finished run; there is nothing to resume")
            raise ValueError(f"{self.checkpoint_path} is not a training checkpoint")
        if self.ema and state.get("ema", 0) is None:
            raise ValueError(f"{self.checkpoint_path} was trained without EMA; resume without --model-ema")
        try:
            self.model.load_state_dict(model_state)
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(state["optimizers"][name])
            for name, scheduler in self.schedulers.items():
                scheduler.load_state_dict(state["schedulers"][name])
            self.task.load_state_dict(self._own_rank_state(state, "task"))
            if self.scaler and state.get("scaler"):  # absent when the run trained without fp16 so far
                self.scaler.load_state_dict(state["scaler"])
            if self.ema:
                self.ema.load_state_dict(state["ema"])
            self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]
            self.best, self.finished = state["best"], bool(state["finished"])
            self._pending_rng = self._own_rank_state(state, "rng")  # applied once the epoch's batches are laid out
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, ValueError) as e:
            # e.g. a checkpoint copied over from a run of another model: load_state_dict lists the keys
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            detail = detail if len(detail) <= 200 else detail[:200] + " ..."
            raise ValueError(
                f"{self.checkpoint_path} does not fit this run (another model or other settings?): "
                f"{type(e).__name__}: {detail}"
            ) from None
        for sink in self.sinks:
            sink.truncate_after(self.step)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train until the last epoch or until the task stops early; returns the last validation metrics."""
        metrics: dict[str, float] = {}
        if self.finished:  # resumed after training ended: the last model is final, evaluate it once more
            return self._evaluate_only()
        with self._signals_save_and_stop():
            while self.epoch < self.config.epochs:
                self._train_epoch()
                metrics = self._evaluate()
                stop = self.task.end_epoch(self.epoch, metrics)
                self.epoch, self.batches_done = self.epoch + 1, 0
                self.finished = stop or self.epoch >= self.config.epochs
                self.save()
                if stop:
                    break
        return metrics

    @property
    def eval_model(self) -> nn.Module:
        """The model that is evaluated and saved: the EMA when there is one."""
        return self.ema.module if self.ema else self.model

    def _evaluate_only(self) -> dict[str, float]:
        """The evaluated model's validation metrics, nothing logged or saved."""
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.eval_model)
        self.model.train()
        return metrics

    def _evaluate(self) -> dict[str, float]:
        """Validation metrics of the evaluated model (the raw model's too, as `raw_*`, under EMA); saves the
        last and best models."""
        record: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.eval_model)
            if self.ema:
                record.update({f"val_raw_{k}": v for k, v in self.task.evaluate(self.model).items()})
        self.model.train()
        record.update({f"val_{k}": v for k, v in metrics.items()})
        name = self.config.best_metric
        if name is not None:
            if name not in metrics:
                raise KeyError(f"best_metric '{name}' is not among the validation metrics {sorted(metrics)}")
            improved = self.best is None or metrics[name] > self.best
            if improved:
                self.best = metrics[name]
            record[f"best_{name}"] = self.best
            if self.context.is_main:
                self.task.save_model(self.eval_model, "last")
                if improved:
                    self.task.save_model(self.eval_model, "best")
        self._write(record)
        self.progress.end_epoch(record)
        return metrics

    def _train_epoch(self) -> None:
        self.model.train()
        batches = self._epoch_batches()
        # A loader draws a seed from the global RNG when an epoch's iterator starts. A checkpoint at an epoch's
        # end was saved before that draw, one in mid-epoch after it: restore the RNG on the matching side.
        if self._pending_rng is not None and not self.batches_done:
            self._restore_rng()
        iterator = iter(batches)
        if self._pending_rng is not None:
            self._restore_rng()
        for batch in self.progress.epoch(iterator, self.epoch, len(self.train_loader), self.batches_done):
            self.train_step(batch)
            self.batches_done += 1
            if self._stop_signal is not None:
                self.save(in_step=False)
                raise TrainingInterrupted(
                    f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved, "
                    f"continue with --resume"
                )
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.save()
            elif self.step % self.config.log_every == 0:
                self._log_interval()
        self._log_interval()  # the epoch's last steps, checked before the epoch's model is evaluated and saved

    def _log_interval(self) -> None:
        """Read the steps since the last log point from the device (one transfer), raise if a loss was not finite,
        and write their metrics line."""
        if not self.metrics.steps:
            return
        state_metrics = getattr(self.task, "state_metrics", None)
        first_non_finite, record = self.metrics.read(state_metrics() if state_metrics else {})
        if first_non_finite >= 0:
            raise NonFiniteLossError(
                f"loss is {record.get('loss', float('nan'))} at step {first_non_finite} (epoch {self.epoch + 1}); "
                f"the last checkpoint is intact: lower the learning rate and resume or restart"
            )
        self._write({"step": self.step, "epoch": self.epoch, **record})
        self.progress.interval(record)

    def _write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def _restore_rng(self) -> None:
        set_rng_state(self._pending_rng, self.device)
        self._pending_rng = None

    def train_step(self, batch: Any) -> dict[str, torch.Tensor | float]:
        """One optimizer step on `batch` (moved to the device here); returns the step's metrics, device tensors
        that are not read here."""
        batch = to_device(batch, self.device)
        with autocast(self.device, self.config.amp):
            loss, metrics = self.task.training_step(self.forward_model, batch)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            for optimizer in self.optimizers.values():
                self.scaler.unscale_(optimizer)  # clip and log the true gradients
        if self.config.grad_clip:
            metrics["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        for optimizer in self.optimizers.values():
            if self.scaler:
                self.scaler.step(optimizer)  # skipped when fp16 gradients overflowed
            else:
                optimizer.step()
        if self.scaler:
            self.scaler.update()
        for scheduler in self.schedulers.values():
            scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        metrics["loss"] = loss.detach()
        for name, optimizer in self.optimizers.items():
            metrics[f"lr_{name}"] = float(optimizer.param_groups[0]["lr"])
        self.task.after_step(metrics)
        self.metrics.add(self.step, loss, metrics)
        return metrics

    def _own_rank_state(self, state: dict[str, Any], name: str) -> Any:
        """This rank's `name` ("rng" or "task") in a checkpoint: its own where the group has the checkpoint's size;
        rank 0's for a checkpoint of another world size or of before per-rank states."""
        by_rank = state.get(f"{name}_by_rank") or [state[name]]
        return by_rank[self.context.rank] if len(by_rank) == self.context.world_size else state[name]

    def _epoch_batches(self) -> DataLoader:
        """This epoch's loader, starting after the batches a resumed run already trained."""
        loader = self.train_loader
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if loader.generator is not None:  # worker seeds depend on (seed, epoch) alone, not on past epochs
            loader.generator.manual_seed(self._loader_seed + self.epoch)
        if not self.batches_done:
            return loader
        remaining = list(sampler)[self.batches_done * loader.batch_size :]
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=remaining,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            collate_fn=loader.collate_fn,
            drop_last=loader.drop_last,
            generator=loader.generator,
        )

    @contextmanager
    def _signals_save_and_stop(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop (main thread only)."""

        def request_stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        try:
            previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
