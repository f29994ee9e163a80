"""Data-parallel runs under ``torchrun``: which process am I, and the few collectives the runner
needs.

``torchrun --nproc-per-node N`` (and multi-node launches) set ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` joins the process group (gloo on CPU, nccl on GPU, each
process on ``cuda:LOCAL_RANK``). Without those variables everything is a single process and the
collectives are no-ops, so the runner has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List

import torch
import torch.distributed as torch_dist

#: long enough for the slowest rank to finish its share before the final barrier
DEFAULT_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    """This process's rank among ``world_size`` processes (0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out


def launched_distributed() -> bool:
    """True when the environment describes a multi-process launch (``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> DistContext:
    """The context of an initialized process group, else a single process."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return DistContext(
            torch_dist.get_rank(),
            torch_dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    return DistContext()


def init_distributed(device: str = "cpu", timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the ``torchrun`` process group when launched by it; returns this process's context.

    ``device="cuda"`` uses nccl and pins the process to ``cuda:LOCAL_RANK``; ``"cpu"`` uses gloo.
    """
    if not launched_distributed():
        return DistContext()
    if not torch_dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run a single process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend, timeout=timeout)
    return current()


def device_for(ctx: DistContext, device: str) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; other devices as given."""
    if device == "cuda" and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return torch.device(device)


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
