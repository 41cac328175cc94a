"""Distillation losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.distillation import DistillationLoss, hard_distillation, soft_distillation


def test_soft_distillation_matches_a_hand_computed_kl():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0]])
    tau = 2.0

    def softmax(row):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    p, q = softmax([0.0, 2.0, 0.0]), softmax([1.0, 0.0, -1.0])  # teacher, student
    expected = tau**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert soft_distillation(student, teacher, tau).item() == pytest.approx(expected, rel=1e-6)


def test_soft_distillation_averages_over_the_batch():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    rows = [soft_distillation(student[i : i + 1], teacher[i : i + 1], 1.5) for i in range(4)]
    assert soft_distillation(student, teacher, 1.5).item() == pytest.approx(sum(rows).item() / 4, rel=1e-6)


def test_teacher_equal_to_student_gives_zero_kd():
    logits = torch.randn(8, 10)
    loss = DistillationLoss("soft", alpha=0.5, tau=3.0)
    _, parts = loss(logits, torch.randint(0, 10, (8,)), logits.clone())
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6)


def test_hard_distillation_is_cross_entropy_on_the_teachers_top1():
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    teacher = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])  # top-1: class 1, class 0
    log_z = [math.log(math.exp(2) + 2), math.log(2 + math.e)]
    expected = ((log_z[0] - 0.0) + (log_z[1] - 0.0)) / 2  # -log softmax of the student at classes 1 and 0
    assert hard_distillation(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_total_mixes_labels_and_teacher_by_alpha():
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    ce = torch.nn.functional.cross_entropy(student, targets)
    kd = soft_distillation(student, teacher, 2.0)
    total, parts = DistillationLoss("soft", alpha=0.3, tau=2.0)(student, targets, teacher)
    assert total.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd.item(), rel=1e-6)
    assert parts == pytest.approx({"ce": ce.item(), "kd": kd.item()})
    plain, parts = DistillationLoss("none")(student, targets)
    assert plain.item() == pytest.approx(ce.item()) and set(parts) == {"ce"}


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="not one of soft, hard, none"):
        DistillationLoss("softer")
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss("soft", alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss("soft", tau=0.0)
    with pytest.raises(ValueError, match="needs the teacher"):
        DistillationLoss("hard")(torch.randn(2, 3), torch.tensor([0, 1]))
