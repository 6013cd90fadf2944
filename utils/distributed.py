"""Rank / world size from Paddle's launcher, set up lazily: importing this module starts nothing.

`python train.py` runs as rank 0 of 1 without any launcher; under `python -m paddle.distributed.launch` the
environment names the rank and world size and `init_distributed()` joins the group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) for a plain process."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")), int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def local_world_size() -> int:
    """Ranks on this node (the launcher's --nproc_per_node), to share the CPU cores between them."""
    return max(1, int(os.environ.get("PADDLE_LOCAL_SIZE", "1")))


def cores_per_rank() -> int:
    """CPU cores available to this process divided by the ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size())


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched with more than one rank; returns (rank, world size)."""
    rank, world = world_from_env()
    if world > 1:
        import paddle.distributed as dist

        dist.init_parallel_env()
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world


def barrier(world: int) -> None:
    """Wait for every rank (a no-op for one process)."""
    if world > 1:
        import paddle.distributed as dist

        dist.barrier()
