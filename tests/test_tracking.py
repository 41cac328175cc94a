"""`--log`: TensorBoard (and W&B, MLflow where installed) get exactly the records of `metrics.jsonl`, at the same
steps, and the final architecture; a resumed run's steps are not logged twice; only the main process logs; a missing
package is refused before any work."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import fine_tuning_loss_turns_nan
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.distributed import DistributedContext
from spvit_search.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from spvit_search.tracking import RUN_IDS, TENSORBOARD_DIR, TensorBoardTracker, build_trackers

TINY = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]


def search_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A one-epoch search of a random test_vit on `image_folder` (8 steps), imitating the dense model."""
    return [
        "search", *TINY, "--data", str(data), "--batch-size", "4", "--out", str(out), "--target", "0.7x",
        "--epochs", "1", "--log-every", "3", "--imitation", *extra,
    ]  # fmt: skip


def finetune_args(subnet: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--subnet", str(subnet), "--data", str(data), "--out", str(out), "--batch-size", "4",
        "--distillation", "none", "--no-progress", "--epochs", "1", "--checkpoint-every", "3", "--log-every", "1",
        *extra,
    ]  # fmt: skip


def jsonl_scalars(run: Path) -> dict[str, list[tuple[int, np.float32]]]:
    """Every metrics.jsonl value as TensorBoard stores it: per key, its (step, float32) in order."""
    scalars: dict[str, list[tuple[int, np.float32]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                scalars.setdefault(key, []).append((record["step"], np.float32(value)))
    return scalars


def tensorboard_events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_scalars(events: EventAccumulator) -> dict[str, list[tuple[int, np.float32]]]:
    return {
        tag: [(e.step, np.float32(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }  # fmt: skip


def architecture_text(events: EventAccumulator) -> str:
    (event,) = events.Tensors("architecture/text_summary")
    return event.tensor_proto.string_val[0].decode()


def test_search_logs_every_metrics_record_and_the_architecture_to_tensorboard(image_folder, tmp_path):
    run = tmp_path / "run"
    assert main(search_args(image_folder, run, "--log", "tensorboard")) == 0
    events = tensorboard_events(run)
    scalars = tensorboard_scalars(events)
    assert scalars == jsonl_scalars(run)
    # The gate statistics, MACs against their target, λ, the imitation terms and the validation metrics among them.
    expected = {"gate.0.msa", "mlp_kept", "macs", "target_macs", "lambda", "imitation", "val_acc1", "val_macs"}
    assert expected <= set(scalars)
    assert [step for step, _ in scalars["loss"]] == [3, 6, 8]
    table = architecture_text(events)
    arch = json.loads((run / "arch.json").read_text())
    assert table.startswith("| block | mixer |") and table.count("\n| ") == len(arch["blocks"]) + 2  # fixed, total
    assert "macs" in table.splitlines()[0]  # priced with the run's lut.csv


def test_resumed_finetune_logs_each_step_once(folder_subnet, image_folder, tmp_path, monkeypatch):
    """A NaN at step 5 stops the run after TensorBoard got step 4; the checkpoint is step 3's: on resume, the events
    after step 3 are purged, and steps 4.. are logged again, once, as metrics.jsonl holds them."""
    fine_tuning_loss_turns_nan(monkeypatch, at_step=5)
    run = tmp_path / "run"
    args = finetune_args(folder_subnet, image_folder, run, "--log", "tensorboard")
    assert main(args) == EXIT_FAILED
    assert [step for step, _ in tensorboard_scalars(tensorboard_events(run))["loss"]] == [1, 2, 3, 4]

    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    events = tensorboard_events(run)
    scalars = tensorboard_scalars(events)
    assert scalars == jsonl_scalars(run)
    assert [step for step, _ in scalars["loss"]] == list(range(1, 9))
    assert {"val_acc1", "best_acc1", "lr_weights"} <= set(scalars)
    assert architecture_text(events).startswith("| block | mixer | kernel | mlp_kept |")  # no lut.csv: the choices


def test_a_missing_tracker_package_is_one_line_before_any_work(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    run = tmp_path / "run"
    assert main(search_args(image_folder, run, "--log", "tensorboard")) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (
        "spvit: error: --log tensorboard needs the tensorboard package: pip install tensorboard "
        "(or pip install 'spvit-search[tracking]')\n"
    )
    assert not run.exists()


def test_only_the_main_process_logs(tmp_path):
    def trackers(rank: int) -> list:
        return build_trackers(["tensorboard"], tmp_path, "project", {}, DistributedContext(rank, 2), resume=False)

    assert trackers(1) == []
    (tracker,) = trackers(0)
    assert isinstance(tracker, TensorBoardTracker)
    assert not (tmp_path / TENSORBOARD_DIR).exists()  # opened at its first record


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_is_written_under_the_run_directory(folder_subnet, image_folder, tmp_path, monkeypatch):
    """Offline, W&B keeps its run in OUT/wandb (its history in a binary log only W&B's tools read): the run under the
    id tracking.json records, with the architecture table."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(finetune_args(folder_subnet, image_folder, run, "--log", "wandb", "--log-project", "tests")) == 0
    run_id = json.loads((run / RUN_IDS).read_text())["wandb"]
    (offline,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").is_file()
    (table,) = (offline / "files" / "media" / "table").glob("architecture_*.table.json")
    table = json.loads(table.read_text())
    arch = json.loads((run / "arch.json").read_text())
    assert table["columns"][:2] == ["block", "mixer"] and len(table["data"]) == len(arch["blocks"]) + 1  # total


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_run_holds_every_metric_and_the_architecture(folder_subnet, image_folder, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise
    run = tmp_path / "run"
    assert main(finetune_args(folder_subnet, image_folder, run, "--log", "mlflow", "--log-project", "tests")) == 0
    run_id = json.loads((run / RUN_IDS).read_text())["mlflow"]
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    for key, values in jsonl_scalars(run).items():
        history = [(m.step, np.float32(m.value)) for m in client.get_metric_history(run_id, key)]
        assert sorted(history) == sorted(values), key
    artifact = client.download_artifacts(run_id, "architecture.md", str(tmp_path))
    assert Path(artifact).read_text().startswith("| block | mixer |")
