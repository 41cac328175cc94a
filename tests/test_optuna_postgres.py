"""An Optuna study on a real PostgreSQL server: workers share it, one dying mid-trial is found out by the heartbeat
and its trial retried, and a worker with other settings is refused.

The server is a throwaway cluster (`initdb` as the `postgres` user where the tests run as root, which `initdb`
refuses) on a free localhost port in a temporary directory, stopped at the end.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from helpers import ForkedSpvit, free_port
from optuna.trial import TrialState

from spvit_search.cli import main

TINY = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _server_binaries() -> Path | None:
    # Debian's versioned server directory first: what is on PATH may be a wrapper of the client tools.
    found = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None) or shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    binaries = _server_binaries()
    if binaries is None:
        if os.environ.get("SPVIT_REQUIRE_POSTGRES"):  # .ci/run: CI must run these tests
            pytest.fail("no PostgreSQL server binary (initdb) on this machine")
        pytest.skip("no PostgreSQL server binary (initdb) on this machine")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install '.[postgres]')")
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="spvit-pg-"))
    if os.geteuid() == 0:  # initdb refuses root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    run = lambda *args: subprocess.run([*as_postgres, *map(str, args)], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(binaries / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    settings = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(binaries / "pg_ctl", "-D", data, "-o", settings, "-l", root / "server.log", "-w", "-t", "60", "start")
    try:
        run(binaries / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "spvit")
        yield f"postgresql://postgres@127.0.0.1:{port}/spvit"
    finally:
        run(binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def optuna_args(checkpoint: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["search", "--strategy", "optuna", *TINY, "--checkpoint", str(checkpoint), "--out", str(out),
            "--storage", url, "--target", "0.6x", "--heartbeat", "1", *extra]  # fmt: skip


def spawn(args: list[str]) -> ForkedSpvit:
    return ForkedSpvit(args, env={"OMP_NUM_THREADS": "1"})


def test_a_worker_killed_mid_trial_is_failed_and_retried(dense_checkpoint, postgres_url, tmp_path, capsys):
    out, trials = tmp_path / "study", 16
    args = optuna_args(dense_checkpoint, out, postgres_url, "--study-name", "killed", "--trials", str(trials),
                       "--eval-batches", "4", "--sampler", "random", "--bn-recalibration", "16")  # fmt: skip
    doomed, survivor = spawn(args), spawn(args)

    def held_by_doomed() -> int | None:
        try:
            held = optuna.load_study(study_name="killed", storage=postgres_url).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # not created yet
            return None
        return next((t.number for t in held if t.user_attrs.get("worker", "").endswith(f":{doomed.pid}")), None)

    deadline, victim = time.time() + 300, None
    while victim is None and time.time() < deadline:
        if held_by_doomed() is None:
            time.sleep(0.02)
            continue
        # Stopped, the doomed worker cannot end the trial it holds: one RUNNING now is the one the kill interrupts.
        # The pause lets the server apply a write the worker had sent just before it stopped.
        os.kill(doomed.pid, signal.SIGSTOP)
        time.sleep(0.2)
        if (victim := held_by_doomed()) is None:
            os.kill(doomed.pid, signal.SIGCONT)
    assert victim is not None, "the doomed worker held no trial"
    doomed.kill()
    doomed.wait()
    assert survivor.wait() == 0, survivor.stderr()[-2000:]

    study = optuna.load_study(study_name="killed", storage=postgres_url)
    every = study.get_trials()
    assert [t.number for t in every] == list(range(len(every)))  # no number twice
    assert len([t for t in every if t.state in FINISHED]) == trials
    of_doomed = [t for t in every if t.user_attrs.get("worker", "").endswith(f":{doomed.pid}")]
    failed = [t.number for t in of_doomed if t.state == TrialState.FAIL]
    assert failed == [victim], [(t.number, t.state.name) for t in of_doomed]  # found out by the heartbeat
    retried = [t for t in every if t.system_attrs.get("failed_trial") == victim]
    # The retry keeps the parameters the victim had drawn (all of them, or those before the kill came mid-draw).
    assert len(retried) == 1 and every[victim].params.items() <= retried[0].params.items()
    rows = (out / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == len(every)  # trials.csv holds what the storage holds
    pareto = json.loads((out / "pareto.json").read_text())
    assert {p["number"] for p in pareto} <= {t.number for t in every if t.state == TrialState.COMPLETE}

    assert main(args) == 0  # a third worker after the end adds nothing
    assert len(optuna.load_study(study_name="killed", storage=postgres_url).get_trials()) == len(every)

    other = optuna_args(dense_checkpoint, tmp_path / "other", postgres_url, "--study-name", "killed",
                        "--trials", str(trials), "--eval-batches", "4", "--sampler", "random",
                        "--bn-recalibration", "16", "--mlp-ratios", "0.5", "1.0")  # fmt: skip
    assert main(other) == 2
    assert "study 'killed' in postgresql://postgres@127.0.0.1" in (err := capsys.readouterr().err)
    assert "was created with other settings: mlp_ratios differ" in err


def test_a_server_that_does_not_answer_is_one_line(dense_checkpoint, tmp_path, capsys):
    pytest.importorskip("psycopg")
    url = f"postgresql://spvit:secret@127.0.0.1:{free_port()}/nothing"
    assert main(optuna_args(dense_checkpoint, tmp_path / "run", url, "--trials", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("spvit: error: --storage postgresql://spvit:***@127.0.0.1") and err.count("\n") == 1
    assert "secret" not in err
