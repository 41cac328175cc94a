"""Faults: a kill in the middle of a checkpoint write, SIGINT/SIGTERM, a NaN loss and a full disk.

Each keeps the last complete checkpoint, leaves no partial file, and `--resume` then finishes the run exactly as an
uninterrupted one (fine-tuning `folder_subnet` on `image_folder`: 8 steps per epoch, a checkpoint every 2 steps).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import ForkedSpvit, fine_tuning_loss_turns_nan
from safetensors.torch import load_file

from finetune.checkpoint import load_checkpoint
from spvit_search.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_IO_ERROR, main
from supernets.io import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the spvit processes and pytest compute alike, bit for bit


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finetune_args(subnet: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--subnet", str(subnet), "--data", str(data), "--out", str(out), "--batch-size", "4",
        "--distillation", "none", "--no-progress", "--checkpoint-every", "2", "--log-every", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight(folder_subnet, image_folder, tmp_path_factory) -> Path:
    """One uninterrupted epoch: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    assert main(finetune_args(folder_subnet, image_folder, out, "--epochs", "1")) == 0
    return out


def assert_same_as(run: Path, straight: Path) -> None:
    """`run` finished, with the straight run's weights and one metrics line per step."""
    assert (run / "summary.json").is_file()
    a, b = load_file(str(run / "last" / "model.safetensors")), load_file(str(straight / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 9))
    assert not list(run.rglob(".*.tmp"))


def checkpoint_step(run: Path) -> int:
    model_state, state = load_checkpoint(run / "checkpoint.safetensors")  # complete and readable
    assert all(torch.isfinite(v).all() for v in model_state.values() if v.is_floating_point())
    return state["step"]


# -- SIGKILL in the middle of a checkpoint write -----------------------------------------------------------------------


def die_in_a_checkpoint_write(kill_at: int, where: str) -> None:
    """Wrap the atomic writer's file operations in this (forked) process: its `kill_at`-th write of
    checkpoint.safetensors dies by SIGKILL half-way through the temporary file (mid-write), or once it is complete
    and fsync'ed but not yet renamed (before-rename)."""
    writes, doomed = [0], set()
    real_mkstemp, real_fdopen, real_replace = tempfile.mkstemp, os.fdopen, os.replace

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if Path(name).name.startswith(".checkpoint.safetensors."):
            writes[0] += 1
            if writes[0] == kill_at:
                doomed.add(fd)
        return fd, name

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return HalfWriter(f) if fd in doomed and where == "mid-write" else f

    def replace(src, dst):
        if where == "before-rename" and Path(dst).name == "checkpoint.safetensors" and writes[0] == kill_at:
            die()
        real_replace(src, dst)

    tempfile.mkstemp, os.fdopen, os.replace = mkstemp, fdopen, replace


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_sigkill_during_a_checkpoint_write_keeps_the_last_one(folder_subnet, image_folder, straight, tmp_path, where):
    out = tmp_path / "run"
    args = finetune_args(folder_subnet, image_folder, out, "--epochs", "1")
    process = ForkedSpvit(args, env=ONE_THREAD, before=lambda: die_in_a_checkpoint_write(2, where))  # at step 4
    assert process.wait() == -signal.SIGKILL, process.stderr()[-2000:]

    assert checkpoint_step(out) == 2  # the previous checkpoint, whole
    (temporary,) = out.glob(".checkpoint.safetensors.*.tmp")  # the write the kill cut off, never renamed
    if where == "mid-write":
        assert temporary.stat().st_size < (out / "checkpoint.safetensors").stat().st_size
    assert not (out / "summary.json").exists()

    assert main([*args, "--resume"]) == 0
    assert_same_as(out, straight)  # ... and the stale temporary file is gone


# -- SIGINT / SIGTERM --------------------------------------------------------------------------------------------------


def _interrupt(argv: list[str], out: Path, signum: int) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        [sys.executable, "-m", "spvit_search.cli", *argv], cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "command, signum", [("search", signal.SIGINT), ("finetune", signal.SIGTERM)], ids=["search-SIGINT", "finetune-TERM"]
)
def test_signal_saves_a_checkpoint_exits_130_and_resume_finishes(
    command, signum, folder_subnet, image_folder, tmp_path
):
    out = tmp_path / "run"
    if command == "search":
        model = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4"]
        argv = ["search", *model, "--data", str(image_folder), "--out", str(out), "--batch-size", "4", "--no-progress",
                "--target", "0.6x", "--patience", "9", "--checkpoint-every", "1"]  # fmt: skip
    else:
        argv = finetune_args(folder_subnet, image_folder, out, "--checkpoint-every", "1")
    argv += ["--epochs", "2"]  # 16 steps

    result = _interrupt(argv, out, signum)
    assert result.returncode == EXIT_INTERRUPTED, result.stderr[-2000:]
    last = result.stderr.strip()  # the real process's whole stderr: one line, no warning or traceback
    assert last.startswith(f"spvit: stopped by signal {int(signum)} at step ") and "\n" not in last, result.stderr
    assert last.endswith("; checkpoint saved, continue with --resume")
    step = int(last.split(" at step ")[1].split(";")[0])
    assert 1 <= step < 16 and checkpoint_step(out) == step
    assert not (out / "summary.json").exists()

    assert main([*argv, "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 16
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 17))


def test_resume_after_a_kill_between_training_and_outputs_writes_them(straight, folder_subnet, image_folder, tmp_path):
    """Killed after the final checkpoint but before summary.json: `--resume` trains no more and writes it."""
    out = shutil.copytree(straight, tmp_path / "run")
    expected = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    assert main(finetune_args(folder_subnet, image_folder, out, "--epochs", "1", "--resume")) == 0
    assert json.loads((out / "summary.json").read_text()) == expected
    assert_same_as(out, straight)


# -- NaN loss ----------------------------------------------------------------------------------------------------------


def test_nan_loss_exits_1_and_keeps_the_last_good_checkpoint(
    folder_subnet, image_folder, straight, tmp_path, monkeypatch, capsys
):
    fine_tuning_loss_turns_nan(monkeypatch, at_step=5)
    out = tmp_path / "run"
    args = finetune_args(folder_subnet, image_folder, out, "--epochs", "1")
    assert main(args) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == (
        "spvit: error: loss is nan at step 5 (epoch 1); the last checkpoint is intact: lower the learning rate and "
        "resume or restart\n"
    )
    assert checkpoint_step(out) == 4
    assert not (out / "summary.json").exists()

    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert_same_as(out, straight)


# -- full disk ---------------------------------------------------------------------------------------------------------


class FullDisk:
    """A disk that fills up: once `free` is set, file writes (the atomic writer's `os.fdopen`, appends through
    `Path.open`) write what still fits, then fail with ENOSPC, as a real full disk does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, arm: callable) -> None:
        self.free: int | None = None
        real_fdopen, real_open, real_replace = os.fdopen, io.open, os.replace

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            return _Filling(f, self) if set(mode) & set("wax+") else f

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _Filling(f, self) if set(mode) & set("wax+") else f

        def replace(src, dst):
            real_replace(src, dst)
            if self.free is None:
                self.free = arm(Path(dst))

        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "replace", replace)


class _Filling:
    def __init__(self, f, disk: FullDisk) -> None:
        self._f, self._disk = f, disk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def write(self, data):
        free = self._disk.free
        if free is not None and len(data) > free:
            self._f.write(data[:free])
            self._f.flush()
            self._disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if free is not None:
            self._disk.free = free - len(data)
        return self._f.write(data)


@pytest.mark.parametrize("fills_in", ["checkpoint", "metrics"])
def test_full_disk_exits_74_leaves_no_partial_file_and_resume_finishes(
    fills_in, folder_subnet, image_folder, straight, tmp_path, monkeypatch, capsys
):
    def arm(written: Path) -> int | None:
        """After the first checkpoint: room for half the next one, or for part of the next metrics line."""
        if written.name != "checkpoint.safetensors":
            return None
        return written.stat().st_size // 2 if fills_in == "checkpoint" else 40

    FullDisk(monkeypatch, arm)
    out = tmp_path / "run"
    args = finetune_args(folder_subnet, image_folder, out, "--epochs", "1")
    assert main(args) == EXIT_IO_ERROR
    err = capsys.readouterr().err
    assert err.startswith("spvit: error: [Errno 28] No space left on device: ") and err.count("\n") == 1
    assert ("checkpoint.safetensors" if fills_in == "checkpoint" else "metrics.jsonl") in err
    assert "files written before are intact" in err

    assert checkpoint_step(out) == 2
    assert not list(out.rglob(".*.tmp"))  # the failed write took its temporary file away
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: a cut-off line was taken back
    assert [r["step"] for r in records] == ([1, 2, 3, 4] if fills_in == "checkpoint" else [1, 2])
    assert json.loads((out / "config.json").read_text())["subnet"] == str(folder_subnet)

    monkeypatch.undo()  # space freed
    assert main([*args, "--resume"]) == 0
    assert_same_as(out, straight)


def test_atomic_write_failure_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "arch.json"
    atomic_write_bytes(target, b"old and complete")
    FullDisk(monkeypatch, lambda written: None).free = 5
    with pytest.raises(OSError, match=r"No space left on device: '.*arch\.json'") as caught:
        atomic_write_bytes(target, b"new content that does not fit")
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old and complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.json"]


def test_permission_denied_exits_74(tmp_path, monkeypatch, capsys):
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    argv = ["lut", "--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4"]
    assert main([*argv, "--out", str(tmp_path / "lut.csv")]) == EXIT_IO_ERROR
    err = capsys.readouterr().err
    assert err == (
        f"spvit: error: [Errno 13] Permission denied: '{tmp_path}' (the system refused a read or write; files "
        "written before are intact)\n"
    )
    assert not list(tmp_path.iterdir())
