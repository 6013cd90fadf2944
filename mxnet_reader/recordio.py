"""Pure-Python RecordIO, byte-compatible with `mxnet.recordio` and dmlc-core's C++ reader and writer.

Format (dmlc-core recordio.h): each record is framed by the magic 0xced7230a and a uint32 `lrecord` whose
upper 3 bits are `cflag` and lower 29 bits the length; the payload is zero-padded to 4 bytes. A payload that
contains the magic at a 4-byte-aligned offset is split there into parts (cflag 1 first, 2 middle, 3 last) and
the magic is dropped; the reader puts it back. `.idx` files are text lines `key<TAB>offset`.

Differences from mxnet, all invisible to a script that only reads and writes:
- Reads go through a read-only memory map of the `.rec` (every OS): a random access is a slice, with no system
  call and no shared file offset, and `read_idx_view` hands the record over without even a copy. The map is
  made on first use; forked DataLoader workers share it and the objects pickle without it (spawn maps anew).
  A file cut short while mapped raises SIGBUS at the read, as any mapped file does; opening checks it whole.
- The index of an integer-keyed `.idx` lives in NumPy arrays (42M keys: ~0.7 GB instead of several GB of
  Python dict, and no copy-on-write growth in forked workers). `.keys` is still a list.
- Every read checks the framing and names the file and key on failure; opening an index checks that every
  offset is 4-byte aligned and inside the file, checks the magic at a spread sample of offsets and checks
  that the last record is complete (a cut-off download is reported at open).
- Writers write to a temporary file in the same directory and rename it into place on `close()`: an
  interrupted conversion never leaves a half-written `.rec` under the final name.

Reading and writing are separate classes: `RecordReader`/`IndexedRecordReader` (mxnet_reader.reader) and
`RecordWriter`/`IndexedRecordWriter` (mxnet_reader.writer). mxnet's `MXRecordIO(uri, flag)` and
`MXIndexedRecordIO(idx, uri, flag)` still work: the flag picks the class, and both are instances of them.
This module holds the format (framing, IRHeader) and those two entry points.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import struct
from collections import namedtuple
from typing import Any

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FRAME = struct.Struct("<II")  # magic, lrecord
LENGTH_BITS = 29
MAX_LENGTH = (1 << LENGTH_BITS) - 1
IR_STRUCT = struct.Struct("<IfQQ")  # flag, label, id, id2 -- mxnet's 'IfQQ': the same 24 bytes on every platform

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Image record header: flag (number of float labels, 0 = one scalar label), label, id, id2."


class RecordIOError(ValueError):
    """A .rec/.idx file is malformed: truncated, misframed, or an index that does not match its record file."""


def padded(length: int) -> int:
    """A payload length rounded up to the 4-byte alignment of records."""
    return (length + 3) & ~3


def encode_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc::RecordIOWriter::WriteRecord does (split at aligned magics, pad to 4)."""
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"RecordIO records must be shorter than 2^29 bytes, got {len(payload)}")
    view = memoryview(payload)
    parts = []
    start = 0
    hit = payload.find(MAGIC_BYTES)
    while hit != -1:
        if hit % 4 == 0:  # the magic sits on a 4-byte boundary of the payload: end a part here, drop the magic
            parts.append(FRAME.pack(MAGIC, ((1 if start == 0 else 2) << LENGTH_BITS) | (hit - start)))
            parts.append(view[start:hit])
            start = hit + 4
            hit = payload.find(MAGIC_BYTES, start)
        else:
            hit = payload.find(MAGIC_BYTES, hit + 1)
    tail = len(payload) - start
    parts.append(FRAME.pack(MAGIC, ((3 if start else 0) << LENGTH_BITS) | tail))
    parts.append(view[start:])
    parts.append(b"\0" * (padded(tail) - tail))
    return b"".join(parts)


class MXRecordIO:
    """Sequential RecordIO with `mxnet.recordio.MXRecordIO`'s interface: flag "r" opens a RecordReader (`read()`
    returns the next record, None at the end), "w" a RecordWriter (`write(buf)` appends; the file appears under
    `uri` on `close()`). What both do alike lives here: open at construction, reset, context manager, close when
    garbage-collected."""

    flag: str  # "r" or "w", set by the class

    def __new__(cls, *args: Any, **kwargs: Any) -> MXRecordIO:
        if cls is MXRecordIO:
            from mxnet_reader.reader import RecordReader
            from mxnet_reader.writer import RecordWriter

            cls = _by_flag(_flag_argument(args, kwargs, 1), RecordReader, RecordWriter)
        return super().__new__(cls)

    def __init__(self, uri: str | os.PathLike, flag: str) -> None:
        if flag != self.flag:
            raise ValueError(f"a {type(self).__name__} has flag {self.flag!r}, got {flag!r}")
        self.uri = str(uri)
        self.is_open = False
        self.open()

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the start: a reader rereads from offset 0, a writer starts an empty file (as in mxnet)."""
        self.close()
        self.open()

    def __enter__(self) -> MXRecordIO:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing sensible left to do
            self.close()


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a `.idx` index for random access, like `mxnet.recordio.MXIndexedRecordIO`: flag "r" opens an
    IndexedRecordReader, "w" an IndexedRecordWriter. `keys` lists the keys in file order; `key_type` converts
    the keys of the index file (int by default; a reader holds integer keys in NumPy arrays, others in a dict)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> MXIndexedRecordIO:
        if cls is MXIndexedRecordIO:
            from mxnet_reader.reader import IndexedRecordReader
            from mxnet_reader.writer import IndexedRecordWriter

            cls = _by_flag(_flag_argument(args, kwargs, 2), IndexedRecordReader, IndexedRecordWriter)
        return super().__new__(cls)

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str, key_type: type = int) -> None:
        self.idx_path = str(idx_path)
        self.key_type = key_type
        super().__init__(uri, flag)

    def offset_of(self, key: Any) -> int:
        raise NotImplementedError

    def __contains__(self, key: Any) -> bool:
        try:
            self.offset_of(key)
        except KeyError:
            return False
        return True


def _flag_argument(args: tuple, kwargs: dict, position: int) -> Any:
    return args[position] if len(args) > position else kwargs.get("flag")


def _by_flag(flag: Any, reader: type, writer: type) -> type:
    if flag not in ("r", "w"):
        raise ValueError(f"flag must be 'r' or 'w', got {flag!r}")
    return reader if flag == "r" else writer


# -- IRHeader helpers (mxnet.recordio's functions, same signatures and results) ------------------------------
def pack(header: IRHeader | tuple, s: bytes) -> bytes:
    """Header + payload -> record bytes. A non-scalar label is stored as `flag` float32s after the header."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=label.size, label=0)
        s = label.tobytes() + s
    return IR_STRUCT.pack(*header) + s


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload). With flag > 0 the label is a float32 array of `flag` values.
    A record too short for its header raises RecordIOError (mxnet: struct.error)."""
    if len(s) < IR_STRUCT.size:
        raise RecordIOError(f"a record of {len(s)} bytes is shorter than the {IR_STRUCT.size}-byte IRHeader")
    header = IRHeader(*IR_STRUCT.unpack_from(s))
    s = s[IR_STRUCT.size:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise RecordIOError(f"IRHeader flag {header.flag} needs {4 * header.flag} bytes of labels, the record "
                                f"has {len(s)} after its header")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag))
        s = s[header.flag * 4:]
    return header, s


def unpack_img(s: bytes, iscolor: int = -1) -> tuple[IRHeader, np.ndarray | None]:
    """Record bytes -> (IRHeader, image) exactly as mxnet: `cv2.imdecode(payload, iscolor)`, so the image is
    BGR (iscolor=-1 keeps the stored channels, 1 forces 3-channel BGR, 0 grayscale) and None if undecodable.
    Training and evaluation decode with `utils.image.decode_rgb` instead (RGB, as arcface_torch)."""
    import cv2

    header, s = unpack(s)
    return header, cv2.imdecode(np.frombuffer(s, dtype=np.uint8), iscolor)


def pack_img(header: IRHeader | tuple, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode an image (BGR, as cv2 expects) with cv2.imencode and pack it; quality is JPEG quality or PNG
    compression level, as in mxnet."""
    import cv2

    params = None
    if img_fmt.upper() in (".JPG", ".JPEG"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif img_fmt.upper() == ".PNG":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    ok, buf = cv2.imencode(img_fmt, img, params)
    if not ok:
        raise ValueError(f"cv2.imencode failed to encode a {img.shape} image as {img_fmt}")
    return pack(header, buf.tobytes())

