"""InsightFace `.bin` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ..., synth_val.bin).

A `.bin` is a pickle of `(bins, issame_list)`: 2N encoded images (pair i is images 2i and 2i+1) and N
bools. Three kinds exist in the wild and all load here: Python-2 pickles of `str`, Python-3 pickles of
`bytes`, and pickles of NumPy uint8 arrays, 1-D or (n, 1) (numpy 1 or numpy 2 module names). Files are read with the
restricted unpickler: a crafted file raises `UnsafePickleError` and runs nothing. Types and counts are
checked before anything is decoded.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from utils.atomic import write_bytes_atomic
from utils.image import decode_rgb
from utils.safe_pickle import UnsafePickleError, restricted_loads

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


def parse_bin(data: bytes, path: str | Path = "<bytes>") -> tuple[list[bytes], np.ndarray]:
    """`read_bin` on a file's contents."""
    path = Path(path)
    try:
        # encoding="bytes" keeps Python-2 `str` payloads as bytes; Python-3 pickles are unaffected.
        obj = restricted_loads(data, encoding="bytes")
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated, not a pickle, bad opcode
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
