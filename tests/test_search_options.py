"""Search options that change how the gates learn: the shared-moment gate optimizer, gate logits initialised from
weight magnitude, and distillation from the dense model during the search."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import TINY, randomize_

from finetune.checkpoint import load_checkpoint, save_checkpoint
from finetune.optim import SharedMomentAdam, gate_optimizer
from spvit_search.cli import main
from spvit_search.discrete_spaces import unit_magnitude
from spvit_search.search import dense_teacher, init_gates_from_magnitude
from supernets import VisionTransformerSupernet


def test_shared_moment_adam_steps_in_proportion_to_the_gradients():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = SharedMomentAdam([a, b], lr=0.1)
    grads = [torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.0, 2.0])]
    a.grad, b.grad = grads
    optimizer.step()
    # First step, after bias correction: m̂ = g and v̂ = mean of g² over all 5 elements, one number for both.
    rms = torch.cat(grads).pow(2).mean().sqrt()
    torch.testing.assert_close(a.detach(), -0.1 * grads[0] / rms)
    torch.testing.assert_close(b.detach(), -0.1 * grads[1] / rms)
    # Per-element Adam would have moved every nonzero-gradient element by the same lr: its first step is sign(g).
    adam = gate_optimizer("adam", [p := torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    p.grad = grads[0]
    adam.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1]), atol=1e-6, rtol=0)


def test_shared_moment_adam_state_survives_a_checkpoint(tmp_path):
    def run(steps: range, resume_from=None) -> tuple[torch.nn.Parameter, SharedMomentAdam]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4))
        optimizer = SharedMomentAdam([p], lr=0.05)
        if resume_from is not None:
            weights, state = load_checkpoint(resume_from)
            p.data.copy_(weights["p"])
            optimizer.load_state_dict(state["optimizer"])
        for i in steps:
            p.grad = torch.sin(p.detach() + i)
            optimizer.step()
        return p, optimizer

    straight, _ = run(range(6))
    half, optimizer = run(range(3))
    save_checkpoint(tmp_path / "c.safetensors", {"p": half.detach()}, {"optimizer": optimizer.state_dict()})
    resumed, _ = run(range(3, 6), tmp_path / "c.safetensors")
    assert torch.equal(resumed, straight)


def test_magnitude_init_ranks_the_logits_and_keeps_the_dense_model():
    torch.manual_seed(0)
    dense = randomize_(timm.create_model("test_vit", **TINY)).eval()
    net = VisionTransformerSupernet(dense, "test_vit").eval()
    images = torch.randn(2, 3, 32, 32)
    expected = dense(images)
    init_gates_from_magnitude(net, 1.5)
    for block in net.blocks:
        logits, magnitude = block.mlp.gates.logits.detach(), unit_magnitude(block.mlp)
        assert torch.equal(logits.argsort(), magnitude.argsort())  # weakest unit, lowest logit
        assert logits.min() > 0 and logits.max() == pytest.approx(3.0)
        assert logits.mean() == pytest.approx(1.5, abs=0.01)
    torch.testing.assert_close(net(images), expected)  # every gate still on: the dense function


def test_the_search_teacher_is_the_dense_model_frozen():
    torch.manual_seed(0)
    dense = randomize_(timm.create_model("test_vit", **TINY)).eval()
    net = VisionTransformerSupernet(dense, "test_vit")
    images = torch.randn(2, 3, 32, 32)
    expected = dense(images)
    teacher = dense_teacher(net)
    with torch.no_grad():
        for logits in net.gate_parameters():
            logits.fill_(-5.0)  # the student's gates move; the teacher's stay dense
    torch.testing.assert_close(teacher(images), expected)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_search_with_distillation_and_the_new_gate_options(dense_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["search", "--model", "test_vit", "--img-size", "32", "--model-kwargs", "patch_size=4", "--no-progress",
            "--checkpoint", str(dense_checkpoint), "--out", str(out), "--target", "0.7x", "--epochs", "1",
            "--distillation", "soft", "--gate-optimizer", "shared_adam", "--gate-init-from", "magnitude"]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["distillation"], config["gate_optimizer"], config["gate_init_from"]) == (
        "soft", "shared_adam", "magnitude",
    )  # fmt: skip
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "complexity"} <= set(steps[0])
