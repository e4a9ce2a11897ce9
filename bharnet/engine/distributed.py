"""Multi-process training through ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N -m bharnet.cli train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
each process then trains on its shard of every epoch. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_joined = False  # whether init() joined the process group (and shutdown() is to leave it)


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> Context:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    global _joined
    context = Context(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        _joined = True
    if device_type == "cuda":
        torch.cuda.set_device(context.local_rank)
    return context


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def sum_over_ranks(context: Context, values, device: torch.device) -> list:
    """The element-wise sums of ``values`` (a list of numbers) over every process, in float64."""
    if not context.distributed:
        return list(values)
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def shutdown() -> None:
    """Leave the process group that :func:`init` joined, once training is done. A process that
    exits without it may abort: gloo's worker threads are still running when the interpreter
    shuts down ("terminate called without an active exception")."""
    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False
