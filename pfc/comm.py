"""The head's collectives. gloo (CPU) lacks reduce_scatter and sums float16 wrongly, so only all_gather and
all_reduce in float32/int64 are used; with one process every call is the identity."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size): the initialised process group's, else a single process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class NumpyComm:
    """Collectives on NumPy arrays (through host tensors): the numpy backend and the facade's input checks."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._tensors = TensorComm(world_size)

    def all_gather(self, array: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return array
        return self._tensors.all_gather(paddle.to_tensor(np.ascontiguousarray(array))).numpy()

    def all_reduce(self, array: np.ndarray, op: Any = None) -> np.ndarray:
        if self.world_size == 1:
            return array
        return self._tensors.all_reduce(paddle.to_tensor(np.ascontiguousarray(array)), op).numpy()


class TensorComm:
    """Collectives on device tensors (the paddle backend): nothing leaves the device."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_gather(self, tensor: paddle.Tensor) -> paddle.Tensor:
        """Concatenation of every rank's tensor along axis 0 (equal shapes on all ranks)."""
        if self.world_size == 1:
            return tensor
        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, tensor)
        return paddle.concat(parts)

    def all_reduce(self, tensor: paddle.Tensor, op: Any = None) -> paddle.Tensor:
        """In place; returns the tensor."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        return tensor


class AllGather(paddle.autograd.PyLayer):
    """all_gather along the batch with a gradient: all_reduce + own slice, times W (DataParallel averages ranks).
    Used by the fused-kernel path, whose loss is differentiated by Paddle's autograd."""

    @staticmethod
    def forward(ctx: Any, tensor: paddle.Tensor, comm: TensorComm, rank: int) -> paddle.Tensor:
        ctx.batch, ctx.dtype, ctx.comm, ctx.rank = tensor.shape[0], tensor.dtype, comm, rank
        return comm.all_gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        grad = ctx.comm.all_reduce(grad.astype("float32"))  # gloo/nccl fp16 sums overflow
        b = ctx.batch
        return (grad[ctx.rank * b:(ctx.rank + 1) * b] * ctx.comm.world_size).astype(ctx.dtype)
