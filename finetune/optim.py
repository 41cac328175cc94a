"""The optimizer of every training run, and its parameter groups."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def adamw(
    params: Iterable[nn.Parameter] | list[dict[str, object]], lr: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU, CUDA and MPS): one kernel for all parameters, and no host read of the step
    counts, which the default per-tensor loop reads with `.item()` for every parameter at every step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def weight_decay_groups(
    model: nn.Module, weight_decay: float, exclude: Iterable[nn.Parameter] = ()
) -> list[dict[str, object]]:
    """AdamW groups as timm and DeiT use them: no decay on biases, norms and other 1-D parameters, nor on
    the names `model.no_weight_decay()` lists (tokens, position embeddings). `exclude` is left out
    (e.g. gate logits, which have an optimizer of their own)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    excluded = {id(p) for p in exclude}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in excluded:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class SharedMomentAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number shared by all the parameters of a group, not one per element.

    Per-element Adam moves every gate logit by about `lr` per step whatever its gradient's scale, so a gate whose
    gradient is noisy (a wide cross-entropy spread) barely answers the complexity loss, whose pull is the same for
    every unit of equal cost: the gates' allocation across blocks then follows gradient noise. With one shared
    second moment the steps stay in proportion to the mean gradients, as plain gradient descent on the Lagrangian
    (cross-entropy + λ·complexity) takes them, and `lr` keeps Adam's units (logit per step at the largest
    gradients)."""

    def __init__(
        self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            shared = self.state[group["params"][0]]  # the group's step count and second moment
            if "step" not in shared:
                shared["step"] = torch.zeros(())  # on the host: bias corrections need no device read
                shared["shared_exp_avg_sq"] = torch.zeros((), device=params[0].device)
            shared["step"] += 1
            step = shared["step"].item()
            mean_square = sum(p.grad.pow(2).sum() for p in params) / sum(p.numel() for p in params)
            shared["shared_exp_avg_sq"].mul_(beta2).add_(mean_square, alpha=1 - beta2)
            denominator = (shared["shared_exp_avg_sq"] / (1 - beta2**step)).sqrt() + group["eps"]
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                p.sub_(state["exp_avg"] / denominator, alpha=group["lr"] / (1 - beta1**step))
        return loss


GATE_OPTIMIZERS = ("adam", "shared_adam")
"""`adam`: AdamW (no decay), one second moment per gate; `shared_adam`: `SharedMomentAdam`."""


def gate_optimizer(name: str, gates: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer of a search's gate logits."""
    if name == "adam":
        return adamw(gates, lr=lr)
    if name == "shared_adam":
        return SharedMomentAdam(gates, lr=lr)
    raise ValueError(f"unknown gate optimizer {name!r}; expected one of {', '.join(GATE_OPTIMIZERS)}")
