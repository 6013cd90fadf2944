"""What the command-line programs share: the process setup their main() starts with, option types that refuse bad
numbers at the parser, a check that an output can be written before any work starts, and the errors that end a
program with one `error: ...` line.

A script run by path (`python tools/x.py`) first makes the project root importable, with the two lines this module
cannot provide for it (it is not importable before them):

    if __package__ in (None, ""):  # run as a script: make the project root importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from utils.cpu import prefer_avx2_mkl
from utils.safe_pickle import UnsafePickleError

# What a user's input can raise: a missing or unwritable file, a bad value, a pickle that would run code.
USER_ERRORS = (OSError, ValueError, UnsafePickleError)


def start_program() -> None:
    """The environment a program (never a library import) sets first in main(), before Paddle is imported: Paddle's
    native INFO logs off unless GLOG_minloglevel is set, no "No ccache found" warning, MKL's AVX2 kernels on AMD
    (utils/cpu.py)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", message="No ccache found")
    prefer_avx2_mkl()


def exit_on_user_error(run: Callable[[], int], also: tuple[type[Exception], ...] = ()) -> int:
    """`run()`'s exit status; a user error (USER_ERRORS, and the types in `also`) instead ends the program with one
    `error: ...` line on stderr and status 1, with no traceback."""
    try:
        return run()
    except (*USER_ERRORS, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a top-k, a thread count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def finite_float(low: float | None = None, high: float | None = None, *,
                 low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [low, high] ((low, high] with `low_open`); NaN and inf are refused."""
    if low is not None and high is not None:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        wanted = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        wanted = "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
              and (high is None or value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


positive_float = finite_float(0, low_open=True)  # a width, a tolerance


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """Raise OSError naming `path` unless a file (or, with `folder`, a folder's files) can be written there.

    Checked before any work, so a long run does not end in a traceback at its last step: the nearest existing
    folder on the way must take a new file (a real probe: permissions, read-only mounts and root all count).
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: cannot write outputs into it (not a folder)")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{path}: cannot write this file (a folder is in the way)")
    parent = path if folder else path.parent
    while not parent.exists():  # the folders still to be made: probe the first one that is there
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: cannot be written ({parent} is a file, not a folder)")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise PermissionError(f"{path}: cannot be written ({parent}: {e.strerror or e})") from None
