"""The training engine: bit-identical resume, signals, non-finite losses and safe checkpoints."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from finetune.checkpoint import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from finetune.ema import ModelEma
from finetune.engine import Engine, EngineConfig, NonFiniteLossError, TrainingInterrupted


class RegressionTask:
    """A tiny task with dropout, so that the RNG state matters for resuming."""

    def __init__(self, nan_at: int | None = None, signal_at: int | None = None) -> None:
        self.steps = 0
        self.nan_at = nan_at
        self.signal_at = signal_at

    def training_step(self, model, batch):
        x, y = batch
        self.steps += 1
        loss = F.mse_loss(F.dropout(model(x), 0.2, training=True), y)
        if self.steps == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.steps == self.nan_at:
            loss = loss * float("nan")
        return loss, {}

    def after_step(self, metrics):
        pass

    def evaluate(self, model):
        return {}

    def end_epoch(self, epoch, metrics):
        return False

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def make_engine(
    out: Path, task: RegressionTask, checkpoint_every: int = 0, ema_decay: float | None = None, amp: str = "none"
) -> Engine:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 4), torch.randn(40, 2))
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, 1, 0, shuffle=True, seed=0))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3)
    config = EngineConfig(
        out, epochs=3, checkpoint_every=checkpoint_every, progress=False, ema_decay=ema_decay, amp=amp, log_every=2
    )
    return Engine(model, task, {"weights": optimizer}, {"weights": scheduler}, loader, config)


def weights(engine: Engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.model.parameters()]


@pytest.mark.parametrize(
    "signal_at, ema_decay", [(3, None), (5, None), (7, None), (7, 0.9)]
)  # 5 batches per epoch: mid-epoch, an epoch's last batch, mid-epoch
def test_sigterm_saves_and_resume_is_bit_identical(tmp_path, signal_at, ema_decay):
    straight = make_engine(tmp_path / "a", RegressionTask(), ema_decay=ema_decay)
    straight.fit()

    interrupted = make_engine(tmp_path / "b", RegressionTask(signal_at=signal_at), ema_decay=ema_decay)
    with pytest.raises(TrainingInterrupted, match="checkpoint saved"):
        interrupted.fit()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = make_engine(tmp_path / "b", RegressionTask(), ema_decay=ema_decay)
    resumed.resume()
    assert (resumed.epoch, resumed.batches_done, resumed.step) == (
        (signal_at - 1) // 5,
        (signal_at - 1) % 5 + 1,
        signal_at,
    )
    resumed.fit()
    assert all(torch.equal(a, b) for a, b in zip(weights(straight), weights(resumed), strict=True))
    averages = [straight.eval_model.state_dict(), resumed.eval_model.state_dict()]
    assert all(torch.equal(averages[0][k], averages[1][k]) for k in averages[0])
    with pytest.raises(ValueError, match="finished run"):
        make_engine(tmp_path / "b", RegressionTask()).resume()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    engine = make_engine(tmp_path, RegressionTask(nan_at=9), checkpoint_every=4)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 9"):
        engine.fit()
    model_state, state = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert state["step"] == 8 and all(torch.isfinite(v).all() for v in model_state.values())


def test_state_flattening_round_trips_nested_optimizer_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"opt": optimizer.state_dict(), "tuple": (1, "a", None), "rng": torch.get_rng_state()}
    tensors = {}
    restored = unflatten_state(flatten_state(state, tensors, "s"), tensors)
    assert restored["tuple"] == (1, "a", None) and torch.equal(restored["rng"], state["rng"])
    assert restored["opt"]["param_groups"] == state["opt"]["param_groups"]
    assert torch.equal(restored["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated, corrupt or not an spvit checkpoint"):
        load_checkpoint(path)


def test_ema_is_the_exponential_average_of_the_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEma(model, decay=0.75)
    for value in (5.0, -3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 1 → 0.75·1 + 0.25·5 = 2 → 0.75·2 + 0.25·(−3) = 0.75
    assert ema.module.weight.item() == pytest.approx(0.75)
    assert not ema.module.weight.requires_grad


class SavingTask(RegressionTask):
    """Validation 'accuracy' that rises, falls, then rises past its best: best/last follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.scores = iter([1.0, 0.5, 2.0])
        self.saved: list[tuple[str, float]] = []
        self.current = 0.0

    def evaluate(self, model):
        self.current = next(self.scores)
        return {"acc1": self.current}

    def save_model(self, model, name):
        self.saved.append((name, self.current))


def test_best_and_last_models_follow_the_best_metric(tmp_path):
    task = SavingTask()
    engine = make_engine(tmp_path, task)
    engine.config.best_metric = "acc1"
    engine.fit()
    assert task.saved == [("last", 1.0), ("best", 1.0), ("last", 0.5), ("last", 2.0), ("best", 2.0)]
    assert load_checkpoint(tmp_path / "checkpoint.safetensors")[1]["best"] == 2.0


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_in_its_dtype(tmp_path, amp, dtype):
    seen = []

    class DtypeTask(RegressionTask):
        def training_step(self, model, batch):
            loss, metrics = super().training_step(model, batch)
            seen.append(model(batch[0]).dtype)
            return loss, metrics

    engine = make_engine(tmp_path, DtypeTask(), amp=amp)
    engine.config.epochs = 1
    engine.fit()
    assert set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())


def test_fp16_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    engine = make_engine(tmp_path, RegressionTask(), amp="fp16")
    assert engine.scaler is not None
    engine.config.epochs = 1
    # A scale the default (65536) would not have: the resumed scaler must carry it.
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    engine.fit()
    saved = engine.scaler.state_dict()
    assert saved["scale"] == 1024.0 and saved["_growth_tracker"] == 5  # 5 steps without an overflow

    resumed = make_engine(tmp_path, RegressionTask(), amp="fp16")
    resumed.resume(finished_ok=True)
    assert resumed.scaler.state_dict() == saved
