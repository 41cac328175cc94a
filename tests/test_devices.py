"""`--device` and `--amp`: resolved once, refused before any work when the machine lacks the device, stored in
config.json; bf16 search and fine-tuning on the CPU train, checkpoint and resume; the engine runs on the suite's
device; a compiled subnet computes what the eager one does."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_engine import RegressionTask
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from finetune.devices import available_devices, resolve_amp, resolve_device
from finetune.engine import Engine, EngineConfig
from spvit_search.cli import main
from spvit_search.export import export_subnet
from supernets import Architecture, BlockChoice, build_supernet

TINY = ["--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def test_auto_picks_the_best_device_and_names_are_checked():
    expected = "cuda" if torch.cuda.is_available() else "mps" if "mps" in available_devices() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="is not one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")


@no_cuda
def test_cuda_without_one_names_the_available_devices():
    with pytest.raises(ValueError, match=r"no CUDA device \(available: cpu"):
        resolve_device("cuda")


def test_amp_defaults_to_none_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "none"
    assert resolve_amp("bf16", cpu) == "bf16" and resolve_amp("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="--amp 'fp8'"):
        resolve_amp("fp8", cpu)


@no_cuda
@pytest.mark.parametrize(
    "command",
    [
        ["lut", "--model", "test_vit"],
        ["search", *TINY, "--target", "0.5x"],
        ["finetune", "--subnet", "SUBNET", "--no-progress"],
        ["eval", "--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4"],
        ["demo", "--no-progress"],
    ],
    ids=lambda c: c[0],
)
def test_an_unavailable_device_fails_before_any_work(command, folder_subnet, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(folder_subnet) if a == "SUBNET" else a for a in command]
    args += ["--out", str(out)] if command[0] in ("search", "finetune", "demo") else []
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spvit: error: --device cuda: this machine has no CUDA device (available: cpu")
    assert len(err.splitlines()) == 1
    assert not out.exists()


def _search(data, out, *extra):
    args = ["search", *TINY, "--data", str(data), "--batch-size", "4", "--out", str(out), "--target", "0.6x"]
    return main([*args, "--epochs", "2", "--checkpoint-every", "5", "--patience", "9", "--workers", "0", *extra])


def _interrupt_after(monkeypatch, steps: int) -> None:
    """The next training stops (as Ctrl-C would) after `steps` optimizer steps, past a checkpoint."""
    train_step = Engine.train_step

    def step(self, batch):
        if self.step == steps:
            raise KeyboardInterrupt
        return train_step(self, batch)

    monkeypatch.setattr(Engine, "train_step", step)


@pytest.mark.cpu_only(reason="bf16 on the CPU, and bit-identical resume (CUDA kernels need not be deterministic)")
def test_bf16_search_on_the_cpu_checkpoints_and_resumes(image_folder, tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _search(image_folder, straight, "--amp", "bf16") == 0  # 2 epochs of 8 steps
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 7)  # past the checkpoint at step 5
        assert _search(image_folder, interrupted, "--bf16") == 130
    assert _search(image_folder, interrupted, "--amp", "bf16", "--resume") == 0
    config = json.loads((straight / "config.json").read_text())
    assert (config["device"], config["amp"]) == ("cpu", "bf16")
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    a, b = (load_file(str(run / "supernet.safetensors")) for run in (straight, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.cpu_only(reason="bf16 on the CPU, and bit-identical resume (CUDA kernels need not be deterministic)")
def test_bf16_finetune_on_the_cpu_checkpoints_and_resumes(folder_subnet, image_folder, tmp_path, monkeypatch):
    def finetune(out, *extra):
        args = ["finetune", "--subnet", str(folder_subnet), "--data", str(image_folder), "--out", str(out)]
        args += ["--distillation", "none", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--no-progress"]
        return main([*args, "--checkpoint-every", "4", "--amp", "bf16", *extra])

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert finetune(straight) == 0
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 6)
        assert finetune(interrupted) == 130
    assert finetune(interrupted, "--resume") == 0
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, interrupted)]
    assert summaries[0]["val_acc1"] == summaries[1]["val_acc1"]
    a, b = (load_file(str(run / "last" / "model.safetensors")) for run in (straight, interrupted))
    assert all(torch.equal(a[k], b[k]) for k in a)


class DeviceTask(RegressionTask):
    """test_engine's regression task, checking that the engine moved the batch, with a metric to log."""

    def training_step(self, model, batch):
        x, y = batch
        assert x.device == next(model.parameters()).device
        return torch.nn.functional.mse_loss(model(x), y), {"mean": model(x).mean()}


def test_the_engine_trains_on_the_suite_device(device, tmp_path):
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 1, 0, shuffle=True, seed=0))
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    config = EngineConfig(tmp_path, epochs=1, progress=False, device=device, log_every=2)
    engine = Engine(model, DeviceTask(), {"w": optimizer}, {}, loader, config)
    engine.fit()
    assert next(engine.model.parameters()).device.type == device.type
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "mean" in r] == [2, 4]  # a line per log interval, means of 2 steps each


def test_compiled_search_and_subnet_forwards_match_the_eager_ones(device):
    """What `--compile` compiles: the supernet's search forward (the same gate draws, graph breaks at each) and the
    exported subnet's forward. Two blocks, and by default the `aot_eager` backend: dynamo's capture (hooks, graph
    breaks, the autograd function) and AOT autograd, without inductor's C++ build, which costs about a minute on 2
    CPU cores. `SPVIT_TEST_COMPILE_BACKEND=inductor` (set by benchmarks/gpu_check.sh) checks the real kernels."""
    backend = os.environ.get("SPVIT_TEST_COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    net = build_supernet("test_vit", img_size=32, num_classes=10, patch_size=4, depth=2).to(device).train()
    images = torch.randn(4, 3, 32, 32, device=device)
    compiled_net = torch.compile(net, backend=backend)
    outputs = []
    for forward in (net, compiled_net):
        net.set_gate_generator(torch.Generator(device=device).manual_seed(3))  # the same draws for both
        outputs.append(forward(images))
    # Inductor fuses and reorders float32 reductions: equal to rounding, not bit for bit.
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)

    arch = Architecture("test_vit", 32, 10, (BlockChoice("bconv3", (0, 5, 9)), BlockChoice("msa", tuple(range(64)))))
    subnet = export_subnet(net, arch).eval()
    with torch.no_grad():
        compiled = torch.compile(subnet, backend=backend)(images)
        torch.testing.assert_close(compiled, subnet(images), rtol=1e-4, atol=1e-5)
