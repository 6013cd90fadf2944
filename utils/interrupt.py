"""Ctrl-C that ends a program with one line, wherever it lands.

Python raises KeyboardInterrupt at the next bytecode the main thread runs. When that is inside a Paddle PyLayer's
backward (the NumPy PReLU, called from Paddle's C++ autograd engine), Paddle re-raises it as an OSError reading
`(External) { ... KeyboardInterrupt ... }`. `sigint_noted()` remembers that SIGINT arrived, so the caller can tell
an interrupt from a real error whatever exception it turned into.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def sigint_noted() -> Iterator[Callable[[], bool]]:
    """Within the block SIGINT still raises KeyboardInterrupt, and the yielded function tells whether one came.

    The previous handler is restored afterwards. Outside the main thread (where no handler can be set) it only
    reports KeyboardInterrupts it cannot see: the function returns False.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received: list[int] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
