"""Host batch arrays lent to Paddle CPU tensors without a copy, and recycled once Paddle frees them.

A fresh 19 MB float32 batch costs ~4,700 page faults (~100 us per image on this VM, more than the work that
fills it) because malloc returns such blocks to the OS when they are freed. So the loader (uint8 batches when
it has no workers) and `to_model_input` (the float32 network input) fill arrays of a `HostBufferPool` and lend
them to tensors through DLPack.

Ownership: a lent array belongs to the tensor until Paddle releases the tensor's storage (autograd graphs
included); Paddle keeps the exporting object alive through the DLPack capsule until then, and the only signal
it gives at release is that object's finaliser. So `lend` wraps the array in a small exporter whose `__del__`
runs the owner's callback: a pool takes the array back, a loader hands a shared-memory slot back to its
workers. Memory handed back can therefore never alias a tensor still in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import paddle
from paddle.utils.dlpack import from_dlpack

SPARE_PER_SHAPE = 2  # arrays kept for reuse per (shape, dtype): one in training, one being filled


class HostBufferPool:
    """Spare host arrays by (shape, dtype), at most SPARE_PER_SHAPE of each; `take` falls back to np.empty."""

    def __init__(self) -> None:
        self._spare: dict[tuple, list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An array of this shape and dtype, recycled if one is free (its contents are stale)."""
        spare = self._spare.get((tuple(shape), np.dtype(dtype)))
        return spare.pop() if spare else np.empty(shape, dtype=dtype)

    def give_back(self, array: np.ndarray) -> None:
        """Return an array no tensor uses any more."""
        spare = self._spare.setdefault((array.shape, array.dtype), [])
        if len(spare) < SPARE_PER_SHAPE:
            spare.append(array)

    def lend(self, array: np.ndarray) -> paddle.Tensor:
        """A CPU tensor on `array`'s memory; the array comes back to this pool when the tensor's storage is freed."""
        return lend(array, lambda: self.give_back(array))

    def copy(self, array: np.ndarray) -> paddle.Tensor:
        """A CPU tensor holding a copy of `array`, in a recycled array."""
        out = self.take(array.shape, array.dtype)
        np.copyto(out, array)
        return self.lend(out)


def lend(array: np.ndarray, on_release: Callable[[], None]) -> paddle.Tensor:
    """A CPU tensor on `array`'s memory (no copy); `on_release()` runs when Paddle frees the tensor's storage."""
    return from_dlpack(np.asarray(_Lent(array, on_release)))


class _Lent:
    """The exporter of a lent array: reports when Paddle lets go of it (see the module docstring)."""

    def __init__(self, array: np.ndarray, on_release: Callable[[], None]) -> None:
        self._on_release = on_release
        self.__array_interface__ = array.__array_interface__
        self._array = array  # keeps the memory alive

    def __del__(self) -> None:
        self._on_release()
