"""`spvit search --strategy optuna`: budget as a constraint, concurrent workers, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import optuna
import pandas as pd
import pytest
import timm
import torch
from helpers import ForkedSpvit
from optuna.trial import TrialState
from safetensors.torch import save_file

from finetune.classification import train_classifier
from lookup_tables import LookupTable
from spvit_search.cli import main
from spvit_search.data import build_dataset, build_loader
from spvit_search.discrete_spaces import BlockwiseSpace, discrete_space
from spvit_search.export import load_search_supernet, load_subnet
from spvit_search.optuna_search import JOURNAL, SharedWeightEvaluator
from supernets import Architecture

TINY = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]


def optuna_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--strategy", "optuna", *TINY, "--checkpoint", str(checkpoint), "--out", str(out), *extra]


def load_study(out: Path) -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(out / JOURNAL))
    return optuna.load_study(study_name="spvit", storage=optuna.storages.JournalStorage(backend))


def test_every_completed_trial_is_within_budget_and_the_best_exports(dense_checkpoint, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(optuna_args(dense_checkpoint, out, "--target", "0.6x", "--trials", "30", "--eval-batches", "2")) == 0
    assert "best trial" in capsys.readouterr().out
    lut = LookupTable.load(out / "lut.csv")
    summary = json.loads((out / "summary.json").read_text())
    target = summary["target_macs"]
    assert target == pytest.approx(0.6 * lut.dense_flops(), abs=1)
    study = load_study(out)
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 30
    space = BlockwiseSpace(load_search_supernet(out / "supernet.safetensors"))
    for t in trials:  # the recorded MACs are the lookup table's; only feasible candidates were evaluated
        macs = lut.flops(space.architecture(t.params))
        assert t.user_attrs["macs"] == macs
        assert (t.state == TrialState.COMPLETE) == (macs <= target)
        assert t.constraints == {"macs": pytest.approx((macs - target) / target)}
    frame = pd.read_csv(out / "trials.csv")
    assert len(frame) == 30 and frame.loc[frame.state == "COMPLETE", "feasible"].all()

    best = Architecture.load(out / "arch.json")
    assert summary["val_acc1"] == max(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "subnet")]) == 0
    assert lut.flops(Architecture.load(tmp_path / "subnet" / "arch.json")) == lut.flops(best) <= target


def test_pareto_objective_writes_a_non_dominated_front(dense_checkpoint, tmp_path):
    out = tmp_path / "pareto"
    args = ["--target", "0.8x", "--trials", "12", "--objective", "pareto", "--sampler", "random", "--eval-batches", "1"]
    assert main(optuna_args(dense_checkpoint, out, *args)) == 0
    front = json.loads((out / "pareto.json").read_text())
    complete = [t for t in load_study(out).get_trials(states=(TrialState.COMPLETE,))]
    assert front and all(len(t.values) == 2 and t.values[1] == t.user_attrs["macs"] for t in complete)
    for point in front:  # no complete trial is at least as good in both and better in one
        assert not any(
            t.values[0] >= point["acc1"] and t.values[1] <= point["macs"] and t.values != [point["acc1"], point["macs"]]
            for t in complete
        )
    assert [p["macs"] for p in front] == sorted(p["macs"] for p in front)


def test_two_processes_share_one_study_without_duplicates(dense_checkpoint, tmp_path):
    out = tmp_path / "shared"
    # Forked at once, the workers start together: both take part in even a short study.
    args = optuna_args(dense_checkpoint, out, "--target", "0.6x", "--trials", "16", "--eval-batches", "2")
    workers = [ForkedSpvit(args, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    for w in workers:
        assert w.wait() == 0, w.stderr()[-2000:]
    trials = load_study(out).get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # every trial exactly once
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 16  # a running trial of the other worker holds its place
    # None lost half-way; a trial started beyond the total by two workers asking at once is failed unrun.
    assert all(t in finished or t.user_attrs.get("surplus") for t in trials)
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} == {str(w.pid) for w in workers}


def die_in_an_evaluation(kill_at: int) -> None:
    """In this (forked) worker, the `kill_at`-th candidate evaluation dies by SIGKILL: mid-trial, between two
    journal writes (a journal lock left behind would hold the resume up for Optuna's 30 s grace)."""
    evaluations, real_call = [0], SharedWeightEvaluator.__call__

    def call(self, arch):
        evaluations[0] += 1
        if evaluations[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_call(self, arch)

    SharedWeightEvaluator.__call__ = call


def test_a_killed_study_resumes_without_duplicates(dense_checkpoint, tmp_path):
    out = tmp_path / "killed"
    args = optuna_args(dense_checkpoint, out, "--target", "0.6x", "--trials", "14", "--eval-batches", "1")
    process = ForkedSpvit(args, env={"OMP_NUM_THREADS": "1"}, before=lambda: die_in_an_evaluation(3))
    assert process.wait() == -signal.SIGKILL, process.stderr()[-2000:]
    before = load_study(out).get_trials()
    assert [t.state for t in before].count(TrialState.RUNNING) == 1  # the one the kill cut off
    assert len(before) < 14

    assert main(args) == 0
    after = load_study(out).get_trials()
    assert [t.number for t in after] == list(range(len(after)))
    assert len(after) > len(before)
    for old in before:  # earlier trials are kept as they were; one cut off by the kill is marked failed
        new = after[old.number]
        assert new.params == old.params
        assert new.state == (TrialState.FAIL if old.state == TrialState.RUNNING else old.state)
    assert len([t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 14


def test_optuna_refusals(dense_checkpoint, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(optuna_args(dense_checkpoint, out, "--trials", "2", "--target", "0.9x", "--resume")) == 2
    assert "without --resume" in capsys.readouterr().err
    assert main(optuna_args(dense_checkpoint, out, "--trials", "2", "--target", "0.001x")) == 2
    assert "outside the search space's range" in capsys.readouterr().err
    assert main(optuna_args(dense_checkpoint, out, "--trials", "2", "--target", "0.9x")) == 0
    capsys.readouterr()
    assert main(optuna_args(dense_checkpoint, out, "--trials", "2", "--target", "0.8x")) == 2
    assert "target differ" in capsys.readouterr().err


FAMILIES = {
    # Narrow T2T layers (token_dim 16), or the T2T module alone would cost more than 0.6x at img 32.
    "t2t_vit_7": {"embed_dim": 128, "depth": 4, "token_dim": 16},
    "sret_t": {"base_dim": 8, "heads": [1, 2, 4], "depth": [4, 2, 2], "recursive_num": [2, 1, 1]},
}


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_family_study_respects_the_budget_and_the_best_exports(model, tmp_path):
    """A tiny model of a family with discrete dimensions, trained two epochs on digits; 30 trials under 0.6x."""
    kwargs = FAMILIES[model]
    torch.manual_seed(0)
    dense = timm.create_model(model, img_size=32, num_classes=10, **kwargs)
    train = build_loader(build_dataset("digits", "train", 32), 64, train=True, seed=0)
    val = build_loader(build_dataset("digits", "val", 32), 256, train=False)
    train_classifier(dense, train, val, tmp_path, epochs=2, lr=2e-3, progress=False)
    save_file(dense.state_dict(), str(tmp_path / "dense.safetensors"))

    out = tmp_path / "study"
    args = ["search", "--strategy", "optuna", "--model", model, "--img-size", "32", "--no-progress"]
    args += [
        "--model-kwargs",
        *(f"{k}={v}" for k, v in kwargs.items()),
        "--checkpoint",
        str(tmp_path / "dense.safetensors"),
    ]
    assert main([*args, "--out", str(out), "--target", "0.6x", "--trials", "30", "--eval-batches", "1"]) == 0
    lut = LookupTable.load(out / "lut.csv")
    target = json.loads((out / "summary.json").read_text())["target_macs"]
    assert target == pytest.approx(0.6 * lut.dense_flops(), abs=1)
    trials = load_study(out).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 30
    space = discrete_space(load_search_supernet(out / "supernet.safetensors"))
    archs = {t.number: space.architecture(t.params) for t in trials}
    for t in trials:  # every completed trial is within the budget, priced by the table; the rest cost nothing
        assert (t.state == TrialState.COMPLETE) == (lut.flops(archs[t.number]) <= target)
    # The family's own dimensions were searched: T2T-ViT's depth or width, SReT's group splits.
    assert len({(a.depth, a.embed_dim, a.groups) for a in archs.values()}) > 1

    assert main(["export", "--run", str(out), "--out", str(tmp_path / "subnet")]) == 0
    subnet = load_subnet(tmp_path / "subnet")
    assert lut.flops(subnet.arch) == lut.flops(Architecture.load(out / "arch.json")) <= target
