"""InsightFace `.bin` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ..., synth_val.bin).

A `.bin` is a pickle of `(bins, issame_list)`: 2N encoded images (pair i is images 2i and 2i+1) and N
bools. Three kinds exist in the wild and all load here: Python-2 pickles of `str`, Python-3 pickles of
`bytes`, and pickles of NumPy uint8 arrays, 1-D or (n, 1) (numpy 1 or numpy 2 module names). Files are read with the
restricted unpickler: a crafted file raises `UnsafePickleError` and runs nothing. Nothing is sized by the
file's claims either: the pickle's structure is checked first (every length inside the file, memo indices no
larger than it: the C unpickler sizes its memo table by the largest), no array may be larger than the file,
and no image header may claim more than utils.encoded_image.MAX_PIXELS. Types and counts are checked before
anything is decoded.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import pickletools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from utils.atomic import write_bytes_atomic
from utils.encoded_image import MAX_PIXELS, claimed_pixels, plausible_size
from utils.image import decode_rgb
from utils.safe_pickle import RestrictedUnpickler, UnsafePickleError

_BOOLS = (bool, np.bool_)


@dataclass
class BinSet:
    """A decoded verification set. Flipped views are made by the evaluator on the fly, not stored."""

    name: str              # file stem, e.g. "lfw"
    path: Path
    images: np.ndarray     # 2N x H x W x 3 uint8 RGB
    issame: np.ndarray     # N bool
    checksum: str          # first 8 hex digits of the file's sha1: which copy of lfw.bin was used

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def _as_bytes(item: object, index: int, path: Path) -> bytes:
    """An image's encoded bytes: bytes, or a uint8 array holding them in any vector shape -- (n,), or (n, 1) as
    `cv2.imencode` returns and InsightFace's own small_lfw.bin stores. An array with two or more dimensions
    longer than 1 holds pixels, not an encoded image, and is refused."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and sum(n > 1 for n in item.shape) <= 1:
        return item.tobytes()
    what = f"{type(item).__name__}" + (f" {item.dtype} {item.shape}" if isinstance(item, np.ndarray) else "")
    raise ValueError(f"{path}: image {index} is a {what}; expected encoded image bytes (bytes, or a uint8 array "
                     "of shape (n,) or (n, 1))")


_ARRAY_TYPE = object()  # what the pickle's `numpy.ndarray` global becomes: an argument of _reconstruct, not callable


class _BinUnpickler(RestrictedUnpickler):
    """The restricted unpickler with arrays no larger than the file: numpy's `_reconstruct(ndarray, shape,
    dtype)` allocates whatever shape it is given (pickles give (0,) and the data later), and `numpy.ndarray`
    itself, called, would too."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")  # bytes: Python-2 `str` payloads stay bytes
        self._limit = len(data)

    def find_class(self, module: str, name: str) -> object:
        found = super().find_class(module, name)
        if found is np.ndarray:
            return _ARRAY_TYPE
        return self._reconstruct if name == "_reconstruct" else found

    def _reconstruct(self, subtype: object, shape: object, dtype: object) -> np.ndarray:
        if subtype is not _ARRAY_TYPE:
            raise UnsafePickleError(f"array subtype {subtype!r} is not allowed")
        dims = shape if isinstance(shape, tuple) else (shape,)
        dtype = np.dtype(dtype)
        if dtype.hasobject or not all(isinstance(d, int) and 0 <= d <= self._limit for d in dims) \
                or math.prod(dims) * dtype.itemsize > self._limit:
            raise ValueError(f"an array of shape {shape} and dtype {dtype} is larger than the file")
        return np.ndarray.__new__(np.ndarray, dims, dtype)


def _check_structure(data: bytes) -> None:
    """Walk the pickle's opcodes (pure Python: a length field beyond the end raises) and bound memo indices."""
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= len(data):
            raise ValueError(f"memo index {arg} is beyond the file")


def parse_bin(data: bytes, path: str | Path = "<bytes>") -> tuple[list[bytes], np.ndarray]:
    """`read_bin` on a file's contents."""
    path = Path(path)
    try:
        _check_structure(data)
        obj = _BinUnpickler(data).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated, not a pickle, bad opcode, oversized claims
        raise ValueError(f"{path}: not a readable .bin pickle, truncated or corrupt ({type(e).__name__}: {e})") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickle of (bins, issame_list), found {type(obj).__name__}"
                         + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: bins is a {type(bins).__name__}; expected a list of encoded images")
    if not isinstance(issame, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: issame_list is a {type(issame).__name__}; expected a list of bools")
    if len(bins) % 2:
        raise ValueError(f"{path}: {len(bins)} images is an odd number; pairs need 2 images each")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images but {len(issame)} issame labels; expected 2 images per pair")
    if not bins:
        raise ValueError(f"{path}: the set holds no pairs")
    labels = np.asarray(issame)
    if labels.dtype != np.bool_:
        bad = next((i for i, v in enumerate(issame) if not (isinstance(v, _BOOLS) or v in (0, 1))), None)
        if bad is not None:
            raise ValueError(f"{path}: issame[{bad}] = {issame[bad]!r} is not a bool")
        labels = labels.astype(np.bool_)
    return [_as_bytes(b, i, path) for i, b in enumerate(bins)], labels


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """A `.bin` file -> (2N encoded images as bytes, N issame bools), validated, nothing decoded yet."""
    return parse_bin(Path(path).read_bytes(), path)


def write_bin(path: str | Path, encoded_images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a `.bin` as a Python-3 pickle of (list of bytes, list of bools) -- what insightface's tools read.

    Atomic: a temp file in the same directory is fsynced and renamed over `path`.
    """
    path = Path(path)
    bins = [bytes(b) for b in encoded_images]
    labels = [bool(v) for v in issame]
    if not bins or len(bins) != 2 * len(labels):
        raise ValueError(f"{path}: need 2 images per pair, got {len(bins)} images for {len(labels)} pairs")
    write_bytes_atomic(path, pickle.dumps((bins, labels), protocol=4))


def load_bin(path: str | Path, image_size: tuple[int, int] = (112, 112), progress: bool = True) -> BinSet:
    """Read and decode a `.bin` to RGB uint8. Images of another size are resized to `image_size` (h, w) with a
    warning (some third-party sets are 120x120 or 160x160); an undecodable image raises, naming its index."""
    path = Path(path)
    data = path.read_bytes()
    bins, issame = parse_bin(data, path)
    height, width = image_size
    images = np.empty((len(bins), height, width, 3), np.uint8)
    resized = 0
    for i, buf in enumerate(tqdm(bins, desc=f"decode {path.name}", unit="img", disable=not progress, leave=False)):
        if not plausible_size(buf):
            raise ValueError(f"{path}: image {i} (pair {i // 2}) claims {claimed_pixels(buf)} pixels in its header, "
                             f"more than {MAX_PIXELS}: a corrupt image")
        try:
            img = decode_rgb(buf)
        except ValueError:
            raise ValueError(f"{path}: image {i} (pair {i // 2}) cannot be decoded") from None
        if img.shape[:2] != (height, width):
            img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if img.shape[0] > height
                             else cv2.INTER_LINEAR)
            resized += 1
        images[i] = img
    if resized:
        warnings.warn(f"{path}: resized {resized} of {len(bins)} images to {height}x{width}", stacklevel=2)
    checksum = hashlib.sha1(data).hexdigest()[:8]
    return BinSet(name=path.stem, path=path, images=images, issame=issame, checksum=checksum)
