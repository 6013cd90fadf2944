"""A guard that makes every read of a Paddle tensor's value on the host raise: code run inside it provably never
synchronises the device with the host (on a GPU each of these reads waits for the device queue to drain)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import paddle

HOST_READS = ("numpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__array__")


class HostReadError(AssertionError):
    """A tensor value was read on the host inside forbid_host_reads()."""


@contextmanager
def forbid_host_reads() -> Iterator[None]:
    """Replace paddle.Tensor's value-reading methods with ones that raise HostReadError; restore them on exit."""
    saved = {name: paddle.Tensor.__dict__.get(name) for name in HOST_READS}

    def refuse(name: str):
        def method(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} called: a host read of a device value")
        return method

    for name in HOST_READS:
        setattr(paddle.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(paddle.Tensor, name)
            else:
                setattr(paddle.Tensor, name, method)
