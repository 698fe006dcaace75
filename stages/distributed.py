"""Data parallel training under ``torchrun``: who am I, the process group, sharding the permutation.

torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE. Without them this
module reports a world of one and every helper is a no-op, so the same recipe runs in one process or
many. The backend is gloo on CPU and nccl on CUDA. Only rank 0 logs to MLflow and writes files (the
pipeline hands the other ranks a NullTracker; the train stage checks ``is_main()`` before writing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The world torchrun describes in the environment (a world of one without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    return World(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size)


def is_main() -> bool:
    return world_from_env().is_main


def init(world: World, device: str) -> bool:
    """Join the process group (once); True when this call created it (and should destroy it)."""
    if not world.distributed:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            rank=world.rank, world_size=world.size)
    return True


def shutdown(created: bool, finished: bool = False) -> None:
    """Leave the process group this process created. ``finished`` (every rank got through its work): first
    wait for the others, so no rank tears gloo down while a peer still writes its results; a rank that
    left early that way aborted (SIGABRT, "terminate called without an active exception") in 1 of 6
    two-process CPU test runs here, 0 of 12 with the barrier. After a failure there is no waiting: the
    peers may be gone."""
    if created:
        import torch.distributed as dist

        if finished:
            dist.barrier()
        dist.destroy_process_group()


def shard(order, world: World):
    """This rank's share of a permutation, as DistributedSampler does it: pad by wrapping around to a
    multiple of the world size (every rank takes the same number of steps), then every size-th index."""
    if not world.distributed:
        return order
    import torch

    n = len(order)
    total = -(-n // world.size) * world.size
    if total > n:
        order = torch.cat([order, order[: total - n]])
    return order[world.rank::world.size]


def all_sum(tensor, world: World):
    """Sum a tensor over all ranks in place (the epoch's loss and accuracy sums); identity alone."""
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_buffers(model, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before validation, so all
    ranks evaluate the same model and make the same early-stopping and plateau decisions."""
    if not world.distributed:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def gather(obj, world: World) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` alone."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
