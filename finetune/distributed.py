"""Process-group setup for `torchrun`: gloo on CPU, NCCL on GPU; a plain single process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group `torchrun` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device: this rank's own GPU
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_store()
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size)
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def _restart_store() -> dist.Store | None:
    """The key space of this attempt in torchrun's agent store, for a group that the agent restarted; None for a
    first attempt or a store of our own.

    The agent keeps serving one store across restarts: without a prefix, a restarted rank that starts before its
    peers reads the dead group's addresses, and gloo's connect to them is refused.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return dist.PrefixStore(f"spvit/restart_{restart}", agent)


def gather_objects(context: DistributedContext, value: Any) -> list[Any]:
    """`value` of every rank, in rank order (every rank calls it); `[value]` in a single process."""
    if not context.enabled:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
