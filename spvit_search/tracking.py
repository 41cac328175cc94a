"""Experiment tracking: a training run's metrics in TensorBoard, Weights & Biases or MLflow, besides `metrics.jsonl`.

`--log tensorboard wandb mlflow` (any of them) gives a search or a fine-tune trackers that the training engine
feeds as it feeds `metrics.jsonl` (they are its metrics sinks): the same records, at the same steps. When the run
finishes they get its architecture table too. Only the main process logs. Each tracker's package is optional; a
missing one is refused before any work.

W&B and MLflow start their run once the run's settings have proved to work (`Run.write_config`), so that a run
refused at start leaves nothing behind and a tracker that cannot start (no W&B login, a bad MLflow URI) stops the run
before it trains, in one line; TensorBoard opens at its first record. A resumed run continues where its checkpoint
stands: TensorBoard purges the events after the checkpoint's step, W&B and MLflow continue the same run (its id is
kept in `OUT/tracking.json`); the steps logged again there hold the same values, since a resume is bit-identical.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from finetune.distributed import DistributedContext
from reports.costs import architecture_table, read_cost_table
from reports.run_format import ARCH, LUT
from reports.table_text import markdown_table
from supernets import Architecture
from supernets.io import atomic_write_text

DEFAULT_PROJECT = "spvit-search"
TENSORBOARD_DIR = "tensorboard"  # under the run directory
RUN_IDS = "tracking.json"  # the W&B and MLflow run ids of the run directory, for a resumed run to continue


class Tracker:
    """A metrics sink of the training engine (`finetune.engine.MetricsSink`) that takes the final architecture as
    well; a subclass opens its session (`_open`) at `start`, or at the first thing it logs."""

    name: ClassVar[str]  # the value of `--log`
    package: ClassVar[str]  # the module it imports
    install: ClassVar[str]  # what to pip install

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any], resume: bool) -> None:
        self.run_dir = run_dir
        self.project = project
        self.config = config  # the run's config.json: W&B's config, MLflow's parameters
        self.resume = resume
        self.session: Any = None

    def start(self) -> None:
        """Open the session, before training (the run directory exists by now)."""
        try:
            self._session()
        except Exception as e:  # credentials, an unreachable server, a bad URI: the user's to fix
            raise ValueError(f"--log {self.name} could not start: {type(e).__name__}: {e}") from e

    def truncate_after(self, step: int) -> None:
        """Nothing to drop: a tracker that keeps a run's history drops the steps it is given again itself."""

    def write(self, record: dict[str, Any]) -> None:
        self._log(record["step"], {k: v for k, v in record.items() if k != "step"})

    def write_architecture(self, table: pd.DataFrame) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        """End the session, marked failed where the tracker records that."""

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def _open(self) -> Any:
        raise NotImplementedError

    def _session(self) -> Any:
        if self.session is None:
            self.session = self._open()
        return self.session

    def _run_id(self) -> str | None:
        """The id this run directory's earlier start logged under, when this start resumes it."""
        path = self.run_dir / RUN_IDS
        if not self.resume or not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8")).get(self.name)

    def _save_run_id(self, run_id: str) -> None:
        path = self.run_dir / RUN_IDS
        ids = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        atomic_write_text(path, json.dumps(ids | {self.name: run_id}, indent=2) + "\n")


class TensorBoardTracker(Tracker):
    """Scalars named as in `metrics.jsonl`, and the architecture as a text (a Markdown table), in `OUT/tensorboard`."""

    name, package, install = "tensorboard", "tensorboard", "tensorboard (or pip install 'spvit-search[tracking]')"
    purge_step: int | None = None

    def start(self) -> None:
        """Nothing yet: the writer opens at the first record, once a resume has said from which step it logs."""

    def truncate_after(self, step: int) -> None:
        self.purge_step = step + 1

    def _open(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, readers drop the earlier events from the first step after the checkpoint on: that is where
        # this start logs again (as metrics.jsonl drops its lines).
        return SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=self.purge_step)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        writer = self._session()
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)

    def write_architecture(self, table: pd.DataFrame) -> None:
        self._session().add_text("architecture", markdown_table(table))

    def close(self, failed: bool) -> None:
        if self.session is not None:
            self.session.close()


class WandbTracker(Tracker):
    """A W&B run in project `--log-project`, its files in `OUT/wandb`; `WANDB_MODE=offline` and W&B's other
    settings hold as W&B reads them."""

    name, package, install = "wandb", "wandb", "wandb"

    def _open(self) -> Any:
        import wandb

        run_id = self._run_id()
        run = wandb.init(
            project=self.project, name=self.run_dir.name, dir=str(self.run_dir), id=run_id,
            resume="allow" if run_id else None, config=None if run_id else self.config,
        )  # fmt: skip
        self._save_run_id(run.id)
        return run

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self._session().log(metrics, step=step)

    def write_architecture(self, table: pd.DataFrame) -> None:
        import wandb

        columns, rows = table_rows(table)
        self._session().log({"architecture": wandb.Table(columns=columns, data=rows)})

    def close(self, failed: bool) -> None:
        if self.session is not None:
            self.session.finish(exit_code=1 if failed else 0)


class MlflowTracker(Tracker):
    """An MLflow run in experiment `--log-project` at MLflow's tracking URI (`MLFLOW_TRACKING_URI`), the run's
    settings as its parameters and the architecture as the artifact `architecture.md`. Through `MlflowClient`, so that
    a run the caller has active is left alone."""

    name, package, install = "mlflow", "mlflow", "mlflow"

    def _open(self) -> Any:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient()
        run_id = self._run_id()
        if run_id is None:
            experiment = client.get_experiment_by_name(self.project)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.project)
            run_id = client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
            params = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in self.config.items()]
            client.log_batch(run_id, params=params)
            self._save_run_id(run_id)
        else:
            client.update_run(run_id, status="RUNNING")
        return client, run_id

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        client, run_id = self._session()
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def write_architecture(self, table: pd.DataFrame) -> None:
        client, run_id = self._session()
        client.log_text(run_id, markdown_table(table), "architecture.md")

    def close(self, failed: bool) -> None:
        if self.session is not None:
            client, run_id = self.session
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


TRACKER_TYPES: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker)}
TRACKERS = tuple(TRACKER_TYPES)  # the choices of --log


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker that is unknown or whose package is not installed (on every rank, before any work)."""
    for name in names:
        tracker = TRACKER_TYPES.get(name)
        if tracker is None:
            raise ValueError(f"--log {name}: not one of {', '.join(TRACKERS)}")
        try:
            importlib.import_module(tracker.package)
        except ImportError:
            raise ValueError(
                f"--log {name} needs the {tracker.package} package: pip install {tracker.install}"
            ) from None


def build_trackers(
    names: list[str], run_dir: Path, project: str, config: dict[str, Any], context: DistributedContext, resume: bool
) -> list[Tracker]:
    """The trackers `names` of a run, on the main process (none on the other ranks), not yet started."""
    if not context.is_main:
        return []
    return [TRACKER_TYPES[name](run_dir, project, config, resume) for name in dict.fromkeys(names)]


@contextmanager
def closing_trackers(trackers: list[Tracker]) -> Iterator[None]:
    """Close `trackers` when the block ends, as failed if it raised."""
    try:
        yield
    except BaseException:
        for tracker in trackers:
            tracker.close(failed=True)
        raise
    for tracker in trackers:
        tracker.close(failed=False)


def write_architecture(trackers: list[Tracker], run_dir: Path) -> None:
    """The architecture the run directory records (`arch.json`), block by block, to every tracker: with MACs and
    params where the run has a lookup table (a search's `lut.csv`)."""
    if not trackers or not (run_dir / ARCH).exists():
        return
    arch = Architecture.load(run_dir / ARCH)
    costs = read_cost_table(run_dir / LUT, []) if (run_dir / LUT).exists() else None
    table = architecture_table(arch, costs)
    for tracker in trackers:
        tracker.write_architecture(table)


def table_rows(table: pd.DataFrame) -> tuple[list[str], list[list[Any]]]:
    """The columns (the block index first) and the rows of a table, its missing cells None."""
    frame = table.reset_index().astype(object)
    return list(frame.columns), frame.where(frame.notna(), None).values.tolist()
