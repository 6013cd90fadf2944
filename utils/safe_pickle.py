"""Restricted unpickling for files users download (.bin sets, .pdparams, .pdopt).

`pickle.load` (and `paddle.load`, which is a pickle) runs whatever callable a file names. These
loaders resolve only the handful of globals that NumPy arrays need, so a crafted file raises
`UnsafePickleError` instead of executing code.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a global that is not on the allow-list (a ValueError: bad input, one line for the user).

    Raised by the file loaders with the file's path first: `PATH: refusing to load global posix.system ...`.
    """


def _dtype(*args: Any, **kwargs: Any) -> np.dtype:
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:  # object arrays would unpickle arbitrary Python objects
        raise UnsafePickleError(f"object dtype {dtype} is not allowed")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles of Python-3 bytes use _codecs.encode(text, 'latin1').
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, encoding)


def _ndarray_reconstruct(subtype: type, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"array subtype {subtype!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _frombuffer(buf: bytes, dtype: Any, shape: Any, order: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=_dtype(dtype)).reshape(shape, order=order)


def _scalar(dtype: Any, data: bytes = b"") -> Any:
    return np.frombuffer(data, dtype=_dtype(dtype), count=1)[0]


_ALLOWED: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict,
                                        ("_codecs", "encode"): _latin1_encode}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _ndarray_reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = _dtype


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds only dicts, lists, tuples, strings, numbers and NumPy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name}: not a plain data pickle") from None


def restricted_loads(data: bytes, *, encoding: str = "ASCII") -> Any:
    """Unpickle `data` allowing only plain data and NumPy arrays. `encoding='bytes'` reads Python-2 pickles."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def restricted_load(path: str | Path, *, encoding: str = "ASCII") -> Any:
    """`restricted_loads` on a file's contents; a refusal names the file."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding=encoding).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e} (nothing from it was run)") from None


def load_paddle_state(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `paddle.save`d state dict (.pdparams / .pdopt) safely, as name -> ndarray.

    Paddle's bookkeeping entry `StructuredToParameterName@@` is dropped; nested dicts (e.g. an LR
    scheduler's state inside .pdopt) are kept as they are.
    """
    try:
        state = restricted_load(path)
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a readable Paddle state file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of arrays, found {type(state).__name__}")
    state = dict(state)
    state.pop("StructuredToParameterName@@", None)
    return state
