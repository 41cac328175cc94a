"""Helpers shared by the tests: tiny model settings, weight randomisation, random architectures, export parity,
fvcore counts and elastic torchrun runs."""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from PIL import Image

from spvit_search.export import export_subnet, load_subnet, save_subnet
from supernets import MIXERS, Architecture, BlockChoice
from supernets.layers.plain import BottleneckConv

TINY = dict(img_size=32, patch_size=4, num_classes=10)


def write_image_folder(folder: Path, counts: dict[str, int], size: tuple[int, int] = (20, 24)) -> Path:
    """`counts[c]` small RGB PNGs, each a different flat colour, in folder/c/: an image-folder dataset."""
    for c, count in counts.items():
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            colour = (40 * i % 256, 60 * len(c) % 256, 200)
            Image.new("RGB", size, colour).save(folder / c / f"{i}.png")
    return folder


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter and BN statistic random values, so that no bias, norm or scale is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gates.logits"):
                continue
            p.copy_(p + scale * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model


def random_architecture(
    depth: int = 6, hidden: int = 192, seed: int = 0, model: str = "test_vit", img_size: int = 32, num_classes: int = 10
) -> Architecture:
    rng = random.Random(seed)
    blocks = [
        BlockChoice(rng.choice(MIXERS), tuple(sorted(rng.sample(range(hidden), rng.randint(0, hidden)))))
        for _ in range(depth)
    ]
    return Architecture(model, img_size, num_classes, tuple(blocks))


def hand_built_bconv(attn, kernel_size: int):
    """Kernel, bias and projection from W_p = Σ_h softmax(z/t)[h, p]·W_v^h, written with plain loops."""
    heads, dh = attn.num_heads, attn.head_dim
    s = torch.softmax(attn.head_mix_logits.detach() / attn.head_mix_temperature, dim=0)  # (heads, 9)
    taps = [(ky, kx) for ky in range(3) for kx in range(3)] if kernel_size == 3 else [(1, 1)]
    wv, wp = attn.v.weight.detach(), attn.proj.weight.detach()
    kernel = torch.zeros(dh, wv.shape[1], kernel_size, kernel_size)
    bias = torch.zeros(dh)
    proj = torch.zeros(wp.shape[0], dh)
    offset = 1 - kernel_size // 2  # tap (1, 1) is the only one, at (0, 0), of a 1x1 kernel
    for ky, kx in taps:
        p = 3 * ky + kx
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            kernel[:, :, ky - offset, kx - offset] += s[h, p] * wv[rows]
            if attn.v.bias is not None:
                bias += s[h, p] * attn.v.bias.detach()[rows]
            proj += s[h, p] * wp[:, rows]
    return kernel, bias, proj


def reference_bconv(attn, x: torch.Tensor, kernel_size: int, batch_stats: bool) -> torch.Tensor:
    """conv → BN → ReLU → projection on the patch grid of x (B, N, D); zeros for the prefix tokens."""
    kernel, bias, proj = hand_built_bconv(attn, kernel_size)
    bn = attn.bn1 if kernel_size == 1 else attn.bn3
    B, _, D = x.shape
    prefix = attn.num_prefix_tokens
    grid = x[:, prefix:].transpose(1, 2).reshape(B, D, *attn.grid_size)
    y = F.conv2d(grid, kernel, bias, padding=kernel_size // 2)
    y = F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, batch_stats, 0.0, bn.eps)
    y = F.linear(F.relu(y).flatten(2).transpose(1, 2), proj, attn.proj.bias)
    return torch.cat([torch.zeros(B, prefix, D), y], dim=1)


def every_mixer_architecture(seed: int, depth: int, hidden: int, **model: object) -> Architecture:
    """Random kept sets (empty and full included) and a random order of mixers that uses each of them."""
    rng = random.Random(seed)
    mixers = [*MIXERS, *rng.choices(MIXERS, k=depth - len(MIXERS))]
    rng.shuffle(mixers)
    widths = [0, hidden, *(rng.randint(1, hidden - 1) for _ in range(depth - 2))]
    rng.shuffle(widths)
    blocks = [BlockChoice(m, tuple(sorted(rng.sample(range(hidden), w)))) for m, w in zip(mixers, widths, strict=True)]
    return Architecture(blocks=tuple(blocks), **model)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, every token of the last block's output): the head reads the class token alone, which conv and
    skip blocks leave untouched, so logits alone could miss a wrong bconv in the last blocks."""
    with torch.no_grad():
        tokens = model.forward_features(x)
        return model.forward_head(tokens), tokens


def max_difference(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The largest logit difference, or token difference relative to the tokens' scale (residual streams
    without a final norm grow to tens, where float32 rounding alone exceeds 1e-4 absolute)."""
    (logits_a, tokens_a), (logits_b, tokens_b) = a, b
    tokens = (tokens_a - tokens_b).abs().max() / tokens_b.abs().max().clamp(min=1.0)
    return max((logits_a - logits_b).abs().max().item(), tokens.item())


def check_parity(net, arch: Architecture, x: torch.Tensor, tmp_path: Path) -> None:
    """Exported, saved-and-loaded and BN-folded subnets all match the supernet with `arch` fixed."""
    net.eval().fix_architecture(arch)
    expected = outputs(net, x)
    net.release_architecture()
    subnet = export_subnet(net, arch)
    assert max_difference(outputs(subnet, x), expected) <= 1e-4
    save_subnet(subnet, tmp_path / "plain")
    assert max_difference(outputs(load_subnet(tmp_path / "plain"), x), expected) <= 1e-4
    folded = export_subnet(net, arch, fold_bn=True)
    assert not any(isinstance(m, BottleneckConv) and isinstance(m.bn, torch.nn.BatchNorm2d) for m in folded.modules())
    assert max_difference(outputs(folded, x), expected) <= 1e-4
    save_subnet(folded, tmp_path / "folded")
    assert max_difference(outputs(load_subnet(tmp_path / "folded"), x), expected) <= 1e-4


def fvcore_macs(model: torch.nn.Module, img_size: int) -> dict[str, int]:
    """fvcore's MACs per operator for one image, plus SDPA's two matmuls (which fvcore skips)."""

    def sdpa(inputs, outputs):
        q, k, v = (i.type().sizes() for i in inputs[:3])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])

    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, img_size, img_size))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return dict(analysis.by_operator())


class ForkedSpvit:
    """`spvit ARGS` in a child forked from this test process: what `subprocess.Popen` of `python -m spvit_search.cli
    ARGS` runs, without its seconds of imports. `before` runs in the child first (to wrap a function, say); the
    child's stdout goes to /dev/null and its stderr to a file that `stderr()` reads. Like Popen's, `returncode` is
    the exit status, or minus the signal that ended the child.

    The child inherits this process's warning filters, so a test of everything a fresh process prints to stderr
    should use a real subprocess."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, before: Callable[[], None] | None = None):
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed with this object)
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            self._run_child(args, env or {}, before)

    def _run_child(self, args: list[str], env: dict[str, str], before: Callable[[], None] | None) -> None:
        code = 1
        try:  # never back into pytest: the child ends in os._exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(self._stderr.fileno(), 2)
            # Streams of the child's own, not pytest's capture; os._exit ends it with them open.
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
            os.environ.update(env)
            if "OMP_NUM_THREADS" in env:
                torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            if before is not None:
                before()
            from spvit_search.cli import main

            code = main(args)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float = 600) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                raise TimeoutError(f"spvit (pid {self.pid}) still ran after {timeout} s")
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forked_ranks(cli_args: list[str], world_size: int = 2) -> list[int]:
    """`spvit CLI_ARGS` as `world_size` gloo ranks forked from this process, with the environment torchrun gives its
    workers and one thread each; returns their exit codes. Forked, the ranks skip the imports (seconds each) that
    a reference run under torchrun would pay."""
    port, fork = free_port(), multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_forked_rank, args=(cli_args, rank, world_size, port)) for rank in range(world_size)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=600)
    return [process.exitcode for process in ranks]


def _forked_rank(cli_args: list[str], rank: int, world_size: int, port: int) -> None:
    from spvit_search.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    sys.exit(main(cli_args))


def elastic_torchrun(*cli_args: str) -> list[str]:
    """`spvit CLI_ARGS` as 2 local processes that torchrun's elastic agent restarts once when one of them dies."""
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "-m", "spvit_search.cli",
            *cli_args]  # fmt: skip


def run_killing_a_rank(command: list[str], checkpoint: Path, env: dict[str, str], rank: int = 1) -> str:
    """Run an `elastic_torchrun` command, SIGKILL its worker of `rank` as soon as `checkpoint` exists (mid-epoch when
    checkpoints come every few steps), and wait for the run to end; asserts that the agent restarted the group and
    the run succeeded, and returns the agent's stderr."""
    agent = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        worker = _worker_of_rank(agent, rank)
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(worker, signal.SIGKILL)
        stderr = agent.communicate(timeout=600)[1]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert f"failed (exitcode: -9) local_rank: {rank}" in stderr, stderr[-2000:]  # and the group went on
    return stderr


def _worker_of_rank(agent: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of the torchrun agent's worker of `rank` (read from the workers' environments)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for task in Path(f"/proc/{agent.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def fine_tuning_loss_turns_nan(monkeypatch, at_step: int) -> None:
    """Make the fine-tuning loss NaN at optimizer step `at_step` of this process (counting from its first)."""
    from spvit_search import finetuning

    training_step = finetuning.DistillationTask.training_step
    calls = []

    def nan_at_the_step(self, model, batch):
        loss, metrics = training_step(self, model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == at_step else loss), metrics

    monkeypatch.setattr(finetuning.DistillationTask, "training_step", nan_at_the_step)
