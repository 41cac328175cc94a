"""`spvit search --strategy optuna`: search the discrete dimensions with Optuna under the FLOPs budget.

The weight-sharing supernet is a free evaluator: a candidate's score is the validation top-1 of the
supernet with the candidate fixed (optionally after re-estimating BN statistics), no training. The
lookup-table MACs are an Optuna constraint (`trial.set_constraint`) checked before any evaluation: an
over-budget candidate is pruned at once and costs nothing.

The study lives in a storage (a JournalStorage file by default, `OUT/study.journal`, or a database URL:
`postgresql://...` for workers on many machines, `sqlite:///...`) that several processes can work on at once;
`--trials` is the study's total of finished (complete or pruned) trials, however many workers share it
(`TrialQuota`), so a killed study continues where it stopped: rerun the command. In a database, each running
trial beats a heartbeat: a worker that dies mid-trial is found out by the others after the grace period, its trial
marked FAIL and retried once. The study records the settings it was created with; a worker with other settings is
refused instead of mixing its trials in.
A run directory (kind `optuna`) holds `config.json`, `lut.csv`, `supernet.safetensors` (so `spvit export --run` works),
`trials.csv`, `pareto.json`, the best `arch.json` and `summary.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import optuna
import pandas as pd
import torch
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState
from torch import nn
from torch.utils.data import DataLoader

from finetune.checkpoint import save_checkpoint
from finetune.classification import evaluate_classifier
from finetune.devices import pin_memory, to_device
from lookup_tables import LookupTable
from reports.run_format import ARCH, JOURNAL, LUT, OPTUNA, PARETO, SUPERNET, TRIALS
from supernets import MIXERS, Architecture, GateConfig, Supernet, build_supernet
from supernets.io import atomic_write_text

from .complexity import budget_metric, check_budget, parse_budget
from .data import DataConfig, build_datasets, build_loaders, num_classes_of
from .discrete_spaces import DEFAULT_MLP_RATIOS, DiscreteSpace, discrete_space
from .export import load_search_supernet
from .metric import LatencyMetric, MacsMetric, cost_metric
from .run_lock import process_exists
from .runs import (
    NOT_SETTINGS,
    DeviceSettings,
    ModelSettings,
    Run,
    RunConfig,
    RunSettings,
    SearchSpaceSettings,
    WeightsSettings,
    start_run,
)
from .search import BudgetSettings, check_num_classes, img_size_of, lookup_table
from .settings import group, inherit

OBJECTIVES = ("accuracy", "pareto")
SAMPLERS = ("tpe", "random", "nsga2")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
COMPILE_NOTE = (
    "--compile leaves the Optuna strategy eager: every trial fixes another architecture, a new graph that "
    "torch.compile would compile anew for one pass over the val set"
)


study_setting = group("optuna strategy (--strategy optuna)")


@dataclass(kw_only=True)
class OptunaConfig(
    RunConfig, RunSettings, DeviceSettings, BudgetSettings, DataConfig, WeightsSettings, SearchSpaceSettings,
    ModelSettings,
):  # fmt: skip
    """Every setting of an Optuna study run; stored as the run's `config.json` (bases: the groups in reverse, as
    `SearchConfig`'s)."""

    kind: ClassVar[str] = OPTUNA
    joinable: ClassVar[bool] = True  # a study continues, or gains workers, by running the same command again

    out: str = inherit(RunSettings, "out", "runs/optuna")
    trials: int = study_setting(30, help="finished trials of the whole study, all processes together")
    objective: str = study_setting(
        "accuracy", choices=OBJECTIVES,
        help="accuracy: best top-1 under the budget; pareto: top-1 vs MACs (multi-objective)",
    )  # fmt: skip
    sampler: str = study_setting("tpe", choices=SAMPLERS, help="how Optuna draws the next candidate")
    storage: str | None = study_setting(
        None, help="journal file, or a database URL: postgresql://USER@HOST:PORT/DB (pip install "
        "'spvit-search[postgres]'), sqlite:///FILE", default_text=f"OUT/{JOURNAL}",
    )  # fmt: skip
    heartbeat: int = study_setting(
        60, help="seconds between a database trial's heartbeats; one silent for 2 of them failed and retried once"
    )
    study_name: str = study_setting("spvit", help="the study's name in --storage")
    supernet: str | None = study_setting(
        None, help="a gradient search's supernet.safetensors to score with (its gates rank the MLP units)",
        default_text="the dense model's weights",
    )  # fmt: skip
    mixers: list[str] = study_setting(factory=lambda: list(MIXERS), choices=MIXERS, help="mixers a block may take")
    mlp_ratios: list[float] = study_setting(
        factory=lambda: list(DEFAULT_MLP_RATIOS), help="shares of MLP units a block keeps"
    )
    bn_recalibration: int = study_setting(0, help="train batches that re-estimate BN statistics before each evaluation")
    eval_batches: int = study_setting(0, help="val batches per evaluation (0: all)")


class SharedWeightEvaluator:
    """Validation top-1 of the supernet with an architecture fixed; the supernet's state is left as found."""

    def __init__(self, net: Supernet, val_loader: DataLoader, train_loader: DataLoader, config: OptunaConfig) -> None:
        self.net = net
        self.val_loader = val_loader
        self.train_loader = train_loader
        self.config = config
        self.batch_norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def __call__(self, arch: Architecture) -> float:
        saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in self.batch_norms]
        self.net.eval()
        self.net.fix_architecture(arch)
        try:
            if self.config.bn_recalibration:
                self._recalibrate()
            return evaluate_classifier(self.net, self._val_batches())["acc1"]
        finally:
            self.net.release_architecture()
            for bn, state in zip(self.batch_norms, saved, strict=True):
                bn.load_state_dict(state)

    def _recalibrate(self) -> None:
        """Re-estimate every BN's statistics as a plain average over a few train batches of this candidate."""
        for bn in self.batch_norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
            bn.train()
        device = next(self.net.parameters()).device
        for i, (images, _) in enumerate(self.train_loader):
            if i == self.config.bn_recalibration:
                break
            self.net(to_device(images, device))
        for bn in self.batch_norms:
            bn.momentum = 0.1
            bn.eval()

    def _val_batches(self) -> list:
        if not self.config.eval_batches:
            return self.val_loader
        return [batch for _, batch in zip(range(self.config.eval_batches), self.val_loader, strict=False)]


def run_optuna(config: OptunaConfig) -> dict[str, Any]:
    """Run (or continue, or join) the study until it has `config.trials` finished trials; returns the summary."""
    _check_config(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the run's own files and summary say what happened
    # Each process is a worker of its own: under torchrun every rank joins the study, no process group needed.
    with start_run(config, distributed=False) as run:
        return _study_run(run)


def _study_run(run: Run) -> dict[str, Any]:
    config: OptunaConfig = run.config
    img_size = img_size_of(config.model, config.img_size)
    train_set, val_set = build_datasets(config, img_size)
    net = _supernet(config, num_classes_of(train_set))
    lut = lookup_table(net, config.convention, config.lut)
    metric = cost_metric(lut, budget_metric(config.target, config.metric))
    target = parse_budget(config.target, metric.dense(), metric.name)
    check_budget(target, metric.range(), config.target, metric.number, metric.unit)
    if not run.joined:
        run.write_config()
        lut.save(run.out_dir / LUT)
        save_checkpoint(run.out_dir / SUPERNET, net.state_dict(), {"config": net.config()})
    space = discrete_space(net, config.mixers, config.mlp_ratios)
    train_loader, val_loader = build_loaders(config, train_set, val_set, config.seed, pin_memory=pin_memory(run.device))
    evaluator = SharedWeightEvaluator(net.to(run.device), val_loader, train_loader, config)
    study, storage = _study(config, run.out_dir)
    quota = TrialQuota(study, storage, config.trials, config.heartbeat)
    if quota.wait_for_places():
        study.optimize(
            _objective(space, lut, metric, target, evaluator, study, quota, config),
            callbacks=[quota],
            catch=(SurplusTrial,),
            show_progress_bar=False,
        )
    return run.finish(write_outputs(study, space, lut, target, net, run.out_dir, metric))


def _objective(
    space: DiscreteSpace,
    lut: LookupTable,
    metric: MacsMetric | LatencyMetric,
    target: float,
    evaluator: SharedWeightEvaluator,
    study: optuna.Study,
    quota: TrialQuota,
    config: OptunaConfig,
):
    worker = f"{socket.gethostname()}:{os.getpid()}"
    multi = config.objective == "pareto"

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr("worker", worker)
        quota.check(trial)
        arch = space.suggest(trial)
        macs, cost = lut.flops(arch), metric.of(arch)
        trial.set_user_attr("macs", macs)
        trial.set_user_attr("params", lut.params(arch))
        if metric.name == "latency":
            trial.set_user_attr("latency_ms", cost)
        trial.set_constraint(metric.name, (cost - target) / target)  # feasible when <= 0
        if cost > target:
            raise optuna.TrialPruned(
                f"{metric.number(cost)} {metric.unit} is over the budget of {metric.number(target)}"
            )
        accuracy = _known_accuracy(study, trial.params)
        if accuracy is None:
            accuracy = evaluator(arch)
        return (accuracy, float(cost)) if multi else accuracy

    return objective


class SurplusTrial(Exception):
    """A trial started beyond the study's `--trials` (by workers asking at the same moment): failed, not run."""


class TrialQuota:
    """Exactly `trials` finished trials in a study, however many workers share it.

    A trial running on another worker holds a place: a worker with no place left waits until it finishes, or until
    it is found dead and failed (by the heartbeat in a database, by its pid on this machine) and its retry takes
    the place. Optuna's own `MaxTrialsCallback` counts finished trials alone: the last worker stopped at once and
    left a dead worker's trial running forever, while workers that were still running added trials beyond the
    total. It is the study's callback after every trial.
    """

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, trials: int, heartbeat: int) -> None:
        self.study = study
        self.storage = storage
        self.trials = trials
        self.heartbeat = isinstance(storage, optuna.storages.RDBStorage)  # a journal file beats none
        self.poll_seconds = heartbeat / 2 if self.heartbeat else 1.0
        self.host = socket.gethostname()

    def wait_for_places(self) -> int:
        """The number of trials the study may still start, once it is known: 0 when it is done."""
        while True:
            if self.heartbeat:
                optuna.storages.fail_stale_trials(self.study)  # and retried once
            else:
                _fail_orphaned_trials(self.study, self.storage)  # those of this machine's workers
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            if finished >= self.trials:
                return 0
            held = sum(t.state == TrialState.RUNNING and self._known_alive(t) for t in trials)
            if finished + held < self.trials:
                return self.trials - finished - held
            time.sleep(self.poll_seconds)

    def _known_alive(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether a running trial's worker would be found out if it died: a trial of another machine in a journal
        file beats no heartbeat, and waiting for it could wait forever."""
        return self.heartbeat or str(trial.user_attrs.get("worker", "")).rpartition(":")[0] == self.host

    def check(self, trial: optuna.Trial) -> None:
        """Raise `SurplusTrial` when the trials before `trial` (by number) already fill the study."""
        ahead = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= self.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is beyond the study's {self.trials} trials")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.wait_for_places():
            study.stop()


def _known_accuracy(study: optuna.Study, params: dict[str, Any]) -> float | None:
    """The score of an earlier complete trial with the same parameters: the same candidate is never evaluated
    twice (concurrent workers and the sampler's repeats)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.params == params:
            return trial.values[0]
    return None


def _study(config: OptunaConfig, out: Path) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    storage = _storage(config.storage or str(out / JOURNAL), config.heartbeat)
    directions = ["maximize", "minimize"] if config.objective == "pareto" else ["maximize"]
    existing = optuna.create_study(
        storage=storage, study_name=config.study_name, directions=directions, load_if_exists=True
    )
    where = f"study '{config.study_name}' in {_redacted(config.storage) if config.storage else out / JOURNAL}"
    if len(existing.directions) != len(directions):
        raise ValueError(f"{where} has another --objective")
    settings = study_settings(config)
    recorded = existing.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        existing.set_user_attr(SETTINGS_ATTR, settings)
    elif recorded != settings:
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        raise ValueError(f"{where} was created with other settings: {', '.join(changed)} differ; use another "
                         f"--study-name or the study's settings")  # fmt: skip
    # A process that joins or continues a study draws other candidates than the ones before it: the sampler's
    # seed counts the trials the study already has.
    seed = config.seed + len(existing.get_trials(deepcopy=False))
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[config.sampler]()
    return optuna.load_study(study_name=config.study_name, storage=storage, sampler=sampler), storage


SETTINGS_ATTR = "spvit_settings"  # the study's user attribute of the settings it was created with


def study_settings(config: OptunaConfig) -> dict[str, Any]:
    """What a study's trials depend on: every setting but where a worker writes and how it runs and shows."""
    per_worker = (*NOT_SETTINGS, "storage", "heartbeat", "num_workers", "seed")
    return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in per_worker}))


def _redacted(url: str) -> str:
    """`url` without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _storage(spec: str, heartbeat: int) -> optuna.storages.BaseStorage:
    if "://" in spec:
        if spec.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:
            raise ValueError("--storage postgresql:// needs the psycopg driver: pip install 'spvit-search[postgres]'")
        try:
            return optuna.storages.RDBStorage(
                spec, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=1),
            )  # fmt: skip
        except Exception as e:  # SQLAlchemy's errors: a bad URL, a server that does not answer
            raise ValueError(f"--storage {_redacted(spec)}: {str(e).splitlines()[0]}") from None
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path))
    )
    return optuna.storages.JournalStorage(backend)


def _fail_orphaned_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Mark FAIL the running trials of workers on this machine that no longer exist (a killed study)."""
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not process_exists(int(pid)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)


def write_outputs(
    study: optuna.Study,
    space: DiscreteSpace,
    lut: LookupTable,
    target: float,
    net: Supernet,
    out: Path,
    metric: MacsMetric | LatencyMetric | None = None,
) -> dict[str, Any]:
    """`trials.csv`, `pareto.json` and the best `arch.json` of the study as it stands; its summary. `target` is in
    `metric`'s units (default: MACs)."""
    metric = metric or MacsMetric(lut)
    trials = study.get_trials(deepcopy=False)
    frame = trials_frame(trials, target)
    atomic_write_text(out / TRIALS, frame.to_csv(index=False))
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and trial_cost(t) <= target]
    if not feasible:
        raise ValueError(f"no trial of study '{study.study_name}' met the budget; run more trials")
    front = pareto_front(feasible)
    atomic_write_text(out / PARETO, json.dumps(front, indent=2) + "\n")
    best = max(feasible, key=lambda t: (t.values[0], -trial_cost(t), -t.number))
    arch = space.architecture(best.params)
    arch.save(out / ARCH)
    latency = {"latency_ms": metric.of(arch), "dense_latency_ms": metric.dense()} if metric.name == "latency" else {}
    return {
        "model": net.name,
        "metric": metric.name,
        **({"target_macs": target} if metric.name == "macs" else {"target_latency_ms": target}),
        **latency,
        "macs": lut.flops(arch),
        "dense_macs": lut.dense_flops(),
        "params": lut.params(arch),
        "dense_params": lut.params(net.dense_architecture()),
        "val_acc1": best.values[0],
        "best_trial": best.number,
        "trials": {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState},
        "mixers": {m: arch.mixers.count(m) for m in MIXERS},
        "mlp_kept": sum(len(b.mlp_kept) for b in arch.blocks) / sum(net.mlp_hidden),
    }


def trial_cost(trial: optuna.trial.FrozenTrial) -> float | None:
    """What a trial's budget counted: its predicted ms in a latency study, else its MACs."""
    return trial.user_attrs.get("latency_ms", trial.user_attrs.get("macs"))


def trials_frame(trials: list[optuna.trial.FrozenTrial], target: float) -> pd.DataFrame:
    """One row per trial: number, state, accuracy, MACs (and predicted ms), params, feasibility, worker and
    parameters."""
    rows = []
    for t in trials:
        cost = trial_cost(t)
        latency = {"latency_ms": t.user_attrs["latency_ms"]} if "latency_ms" in t.user_attrs else {}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.values[0] if t.values else None,
                "macs": t.user_attrs.get("macs"),
                **latency,
                "params": t.user_attrs.get("params"),
                "feasible": None if cost is None else cost <= target,
                "worker": t.user_attrs.get("worker"),
                "duration_s": t.duration.total_seconds() if t.duration else None,
                **{f"params_{k}": v for k, v in t.params.items()},
            }
        )
    return pd.DataFrame(rows)


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    """The trials no other trial beats in both accuracy (higher) and MACs (lower), by increasing MACs."""
    points = sorted(trials, key=lambda t: (trial_cost(t), -t.values[0], t.number))
    front, best_accuracy = [], float("-inf")
    for t in points:
        if t.values[0] > best_accuracy:
            front.append(
                {
                    "number": t.number,
                    "acc1": t.values[0],
                    "macs": t.user_attrs["macs"],
                    "params": t.user_attrs["params"],
                }
            )
            best_accuracy = t.values[0]
    return front


def _supernet(config: OptunaConfig, dataset_classes: int) -> Supernet:
    num_classes = check_num_classes(config.num_classes, dataset_classes)
    if config.supernet is None:
        return build_supernet(
            config.model, pretrained=config.pretrained, checkpoint_path=config.checkpoint, img_size=config.img_size,
            num_classes=num_classes, gates=GateConfig(skip_mixer=config.skip_mixer), **config.model_kwargs,
        )  # fmt: skip
    if config.checkpoint or config.pretrained:
        raise ValueError("--supernet already holds the weights; leave out --checkpoint and --pretrained")
    net = load_search_supernet(config.supernet)
    if net.name != config.model or net.num_classes != num_classes:
        raise ValueError(
            f"--supernet {config.supernet} is a '{net.name}' supernet with {net.num_classes} classes, not "
            f"'{config.model}' with {num_classes}"
        )
    net.set_skip_mixer(config.skip_mixer)  # an identity search's weights with affine skips: s = 1, t = 0
    return net


def _check_config(config: OptunaConfig) -> None:
    if config.objective not in OBJECTIVES:
        raise ValueError(f"--objective '{config.objective}' is not one of {', '.join(OBJECTIVES)}")
    if config.sampler not in SAMPLERS:
        raise ValueError(f"--sampler '{config.sampler}' is not one of {', '.join(SAMPLERS)}")
    if config.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {config.trials}")
