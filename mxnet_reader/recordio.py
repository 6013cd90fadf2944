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
"""

from __future__ import annotations

import contextlib
import mmap
import numbers
import os
import struct
import warnings
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrecord
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_IR = struct.Struct("<IfQQ")  # flag, label, id, id2 -- mxnet's 'IfQQ' has the same 24-byte layout on every platform
_MAX_OFFSET = 1 << 62  # keys and offsets beyond this are not from a real index (and would overflow int64)
_OPEN_CHECK_SAMPLES = 256  # offsets whose magic is checked when an index is opened (every read checks its own)

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Image record header: flag (number of float labels, 0 = one scalar label), label, id, id2."


class RecordIOError(ValueError):
    """A .rec/.idx file is malformed: truncated, misframed, or an index that does not match its record file."""


def _padded(length: int) -> int:
    return (length + 3) & ~3


def encode_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc::RecordIOWriter::WriteRecord does (split at aligned magics, pad to 4)."""
    if len(payload) > _MAX_LENGTH:
        raise ValueError(f"RecordIO records must be shorter than 2^29 bytes, got {len(payload)}")
    view = memoryview(payload)
    parts = []
    start = 0
    hit = payload.find(_MAGIC_BYTES)
    while hit != -1:
        if hit % 4 == 0:  # the magic sits on a 4-byte boundary of the payload: end a part here, drop the magic
            parts.append(_FRAME.pack(MAGIC, ((1 if start == 0 else 2) << _LENGTH_BITS) | (hit - start)))
            parts.append(view[start:hit])
            start = hit + 4
            hit = payload.find(_MAGIC_BYTES, start)
        else:
            hit = payload.find(_MAGIC_BYTES, hit + 1)
    tail = len(payload) - start
    parts.append(_FRAME.pack(MAGIC, ((3 if start else 0) << _LENGTH_BITS) | tail))
    parts.append(view[start:])
    parts.append(b"\0" * (_padded(tail) - tail))
    return b"".join(parts)


class MXRecordIO:
    """Sequential RecordIO reader/writer with `mxnet.recordio.MXRecordIO`'s interface.

    flag "r": `read()` returns the next record's bytes, or None at the end of the file.
    flag "w": `write(buf)` appends a record; the file appears under `uri` when `close()` is called.
    """

    def __init__(self, uri: str | os.PathLike, flag: str) -> None:
        if flag not in ("r", "w"):
            raise ValueError(f"flag must be 'r' or 'w', got {flag!r}")
        self.uri = str(uri)
        self.flag = flag
        self.is_open = False
        self.open()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def open(self) -> None:
        """Open for reading (the file is mapped on first use) or start a new file."""
        self._map: mmap.mmap | bytes | None = None
        self._view: memoryview | None = None
        self._file = None
        self._pos = 0
        if self.flag == "w":
            self._tmp = _temp_path(self.uri)
            self._file = open(self._tmp, "wb")  # noqa: SIM115 -- kept open until close()
        else:
            if not os.path.isfile(self.uri):
                raise FileNotFoundError(f"RecordIO file not found: {self.uri}")
            self._size = os.path.getsize(self.uri)
        self.is_open = True

    def close(self) -> None:
        """Close; a writer flushes, fsyncs and renames its temporary file to `uri`."""
        if not self.is_open:
            return
        self.is_open = False
        if self.flag == "w":
            _commit(self._file, self._tmp, self.uri)
        else:
            self._release_handle()

    def abort(self) -> None:
        """Writer only: discard everything written since open(); `uri` is left as it was."""
        if self.is_open and self.flag == "w":
            self.is_open = False
            self._file.close()
            os.unlink(self._tmp)

    def reset(self) -> None:
        """Back to the start: a reader rereads from offset 0, a writer starts an empty file (as in mxnet)."""
        self.close()
        self.open()

    def __enter__(self) -> MXRecordIO:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None and self.flag == "w":
            self.abort()  # an exception while writing: keep the previous file, not a partial one
        else:
            self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing sensible left to do
            self.close()

    def __getstate__(self) -> dict:
        if self.flag == "w":
            raise TypeError(f"a RecordIO writer cannot be pickled ({self.uri})")
        return {k: v for k, v in self.__dict__.items() if k not in ("_map", "_view")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map = self._view = None

    # -- reads through the memory map ---------------------------------------------------------------------
    def _release_handle(self) -> None:
        if self._view is not None:
            self._view.release()
        if isinstance(self._map, mmap.mmap):
            with contextlib.suppress(BufferError):  # a record view still in use keeps the map until it goes
                self._map.close()
        self._map = self._view = None

    def _mapped(self) -> memoryview:
        """The whole file as a read-only view, mapped on first use (an empty file cannot be mapped: b'')."""
        if self._view is None:
            if not self.is_open:
                raise ValueError(f"RecordIO file is closed: {self.uri}")
            with open(self.uri, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._view = memoryview(self._map)
        return self._view

    def _error(self, key: Any, offset: int, what: str) -> RecordIOError:
        where = self.uri if key is None else f"{self.uri} key {key}"
        return RecordIOError(f"{where} at offset {offset}: {what} (file size {self._size})")

    def _read_record(self, offset: int, key: Any = None) -> tuple[memoryview | bytes, int]:
        """The record starting at `offset` and the offset after it: a view of the map for a one-part record
        (no copy), the parts joined with their magics put back for a split one."""
        data = self._mapped()
        parts = []
        pos = offset
        while True:
            if pos + _FRAME.size > len(data):
                raise self._error(key, pos, "truncated file: it ends inside a record header")
            magic, lrecord = _FRAME.unpack_from(data, pos)
            cflag, length = lrecord >> _LENGTH_BITS, lrecord & _MAX_LENGTH
            if magic != MAGIC or cflag not in ((2, 3) if parts else (0, 1)):
                raise self._error(key, pos, "not a record boundary (no RecordIO magic / wrong part flag)")
            start = pos + _FRAME.size
            if start + length > len(data):
                raise self._error(key, pos, f"truncated file: the record needs {length} bytes after its header")
            pos = start + _padded(length)
            if cflag == 0:
                return data[start:start + length], pos
            parts.append(data[start:start + length])
            if cflag == 3:
                return _MAGIC_BYTES.join(parts), pos

    # -- public reading / writing ------------------------------------------------------------------------
    def read(self) -> bytes | None:
        """The next record, or None at the end of the file."""
        if self.flag != "r":
            raise ValueError(f"{self.uri} is open for writing")
        if self._pos >= self._size:
            return None
        data, self._pos = self._read_record(self._pos)
        return bytes(data)

    def write(self, buf: bytes) -> None:
        """Append one record."""
        if self.flag != "w" or not self.is_open:
            raise ValueError(f"{self.uri} is not open for writing")
        self._file.write(encode_record(bytes(buf)))

    def tell(self) -> int:
        """Current offset: where the next record will be read or written."""
        return self._file.tell() if self.flag == "w" else self._pos


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a `.idx` index for random access, like `mxnet.recordio.MXIndexedRecordIO`.

    `keys` lists the keys in file order; `read_idx(key)` returns one record. `key_type` converts the keys
    of the index file (int by default; integer keys are held in NumPy arrays, others in a dict).
    """

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str, key_type: type = int) -> None:
        self.idx_path = str(idx_path)
        self.key_type = key_type
        super().__init__(uri, flag)

    def open(self) -> None:
        super().open()
        self._keys_list: list | None = None
        if self.flag == "w":
            self._idx_tmp = _temp_path(self.idx_path)
            self._fidx = open(self._idx_tmp, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
            self._written: dict = {}
            return
        if not os.path.isfile(self.idx_path):
            raise FileNotFoundError(f"RecordIO index not found: {self.idx_path}")
        keys, offsets = _parse_idx(self.idx_path, self.key_type)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self._validate_offsets(keys, offsets)
        if self.key_type is int:
            self._key_array = keys = np.ascontiguousarray(keys, dtype=np.int64)
            order = np.argsort(keys, kind="stable")
            sorted_keys, self._sorted_offsets = keys[order], offsets[order]
            # keys first..first+n-1 (InsightFace sets): the offset of key k is entry k - first, no search
            dense = len(keys) and bool(np.all(np.diff(sorted_keys) == 1))  # no gaps and no duplicates
            self._first_key = int(sorted_keys[0]) if dense else None
            self._sorted_keys = None if dense else sorted_keys
            self._lookup = None
        else:
            self._key_array = keys
            self._lookup = dict(zip(keys, offsets.tolist(), strict=True))  # duplicates: the last wins, as mxnet

    def close(self) -> None:
        if self.is_open and self.flag == "w":
            _commit(self._fidx, self._idx_tmp, self.idx_path)
        super().close()

    def abort(self) -> None:
        if self.is_open and self.flag == "w":
            self._fidx.close()
            os.unlink(self._idx_tmp)
        super().abort()

    @property
    def keys(self) -> list:
        """All keys in index-file order (a list, as in mxnet)."""
        if self.flag == "w":
            return list(self._written)
        if self._keys_list is None:
            self._keys_list = self._key_array.tolist() if self._lookup is None else list(self._key_array)
        return self._keys_list

    @property
    def key_array(self) -> np.ndarray:
        """Integer keys in index-file order as an int64 array (no Python list of 42M ints)."""
        if self._lookup is not None or self.flag == "w":
            raise TypeError("key_array needs a reader with integer keys")
        return self._key_array

    def __len__(self) -> int:
        return len(self._written) if self.flag == "w" else len(self._key_array)

    def __contains__(self, key: Any) -> bool:
        try:
            self.offset_of(key)
        except KeyError:
            return False
        return True

    def offset_of(self, key: Any) -> int:
        """Byte offset of `key` in the .rec file; KeyError if the index has no such key."""
        if self.flag == "w":
            return self._written[self.key_type(key)]
        if self._lookup is not None:
            return self._lookup[key]
        if self._first_key is not None and isinstance(key, (int, np.integer)):
            i = int(key) - self._first_key
            if 0 <= i < len(self._sorted_offsets):
                return int(self._sorted_offsets[i])
            raise KeyError(f"key {key} not in {self.idx_path}")
        i = int(np.searchsorted(self._sorted_keys, key, side="right")) - 1  # last of duplicates, as a dict would
        if i < 0 or self._sorted_keys[i] != key:
            raise KeyError(f"key {key} not in {self.idx_path}")
        return int(self._sorted_offsets[i])

    def seek(self, idx: Any) -> None:
        """Position the sequential reader at record `idx`."""
        self._pos = self.offset_of(idx)

    def read_idx(self, idx: Any) -> bytes:
        """The record stored under key `idx`."""
        return bytes(self.read_idx_view(idx))

    def read_idx_view(self, idx: Any) -> memoryview:
        """`read_idx` without the copy: a read-only view of the record in the mapped file (not in mxnet)."""
        if self.flag != "r":
            raise ValueError(f"{self.uri} is open for writing")
        return memoryview(self._read_record(self.offset_of(idx), idx)[0])

    def read_header(self, idx: Any) -> tuple[IRHeader, memoryview]:
        """`unpack(read_idx(idx))` without the copy, with errors naming the file and key (not in mxnet)."""
        offset = self.offset_of(idx)
        return self._unpacked(self._read_record(offset, idx)[0], idx, offset)

    def _unpacked(self, record: memoryview | bytes, key: Any, offset: int) -> tuple[IRHeader, memoryview | bytes]:
        try:
            return unpack(record)
        except RecordIOError as err:
            raise self._error(key, offset, str(err)) from None

    def covers(self, start: int, stop: int) -> bool:
        """Whether every integer key in [start, stop) is in the index (not in mxnet)."""
        if stop <= start:
            return True
        if self._first_key is not None:
            return self._first_key <= start and stop <= self._first_key + len(self._sorted_offsets)
        if self._sorted_keys is None:
            return False
        lo, hi = np.searchsorted(self._sorted_keys, [start, stop])
        inside = self._sorted_keys[lo:hi]
        return len(inside) >= stop - start and int(np.count_nonzero(np.diff(inside))) + 1 == stop - start

    def read_images(self, keys: np.ndarray) -> tuple[np.ndarray, list[memoryview | bytes]]:
        """(labels, payloads) of the image records under `keys`: what `unpack(read_idx(key))` gives for each
        (the first value of a multi-float label), for a whole batch at once (not in mxnet).

        Framing and IRHeaders are read with NumPy gathers over the mapped file and payloads are views of it, so
        a record costs a slice, not a dozen Python steps; records that are not plain one-part image records
        (split, or misframed: the errors come from there) take the checked record reader and `unpack`.
        """
        keys = np.asarray(keys)
        offsets = self._offsets_of(keys)
        data = self._mapped()
        words = np.frombuffer(data, np.uint32, len(data) // 4)  # records are 4-byte aligned
        at = offsets // 4
        magic, lrecord, flag, label, first_of_many = (
            words[np.minimum(at + k, len(words) - 1)].astype(np.int64) for k in (0, 1, 2, 3, 8))
        length = lrecord & _MAX_LENGTH
        start, end = offsets + _FRAME.size + _IR.size + 4 * flag, offsets + _FRAME.size + length
        plain = (magic == MAGIC) & (lrecord >> _LENGTH_BITS == 0) & (flag >= 0) & (start <= end) & (end <= len(data))
        labels = np.where(flag == 0, label, first_of_many).astype(np.uint32).view(np.float32).astype(np.float64)
        payloads = [data[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]
        for j in np.flatnonzero(~plain).tolist():
            key, offset = keys[j].item(), int(offsets[j])
            header, payloads[j] = self._unpacked(self._read_record(offset, key)[0], key, offset)
            labels[j] = header.label if header.flag == 0 else header.label[0]
        return labels, payloads

    def _offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """offset_of for many keys; the integer keys of an InsightFace index in one NumPy step."""
        if self.flag == "r" and self._first_key is not None and keys.dtype.kind in "iu":
            rows = keys.astype(np.int64) - self._first_key
            missing = (rows < 0) | (rows >= len(self._sorted_offsets))
            if missing.any():
                raise KeyError(f"key {keys[missing][0]} not in {self.idx_path}")
            return self._sorted_offsets[rows]
        return np.array([self.offset_of(key) for key in keys.tolist()], dtype=np.int64)

    def write_idx(self, idx: Any, buf: bytes) -> None:
        """Append a record and index it under key `idx`."""
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self._fidx.write(f"{key}\t{pos}\n")
        self._written[key] = pos

    def _validate_offsets(self, keys: Any, offsets: np.ndarray) -> None:
        """Cheap, sound checks at open: alignment and bounds of every offset, the magic at a spread sample of
        offsets, and a complete last record. Every later read checks its own framing."""
        if len(offsets) == 0:
            return
        bad = np.flatnonzero((offsets % 4 != 0) | (offsets < 0) | (offsets > self._size - _FRAME.size))
        if len(bad):
            i = int(bad[0])
            key, off = keys[i], int(offsets[i])
            what = "not 4-byte aligned, so not a record boundary" if off % 4 else f"past the end ({self._size} bytes)"
            raise RecordIOError(f"{self.idx_path}: key {key} has offset {off} in {self.uri}, {what}")
        sample = np.unique(np.linspace(0, len(offsets) - 1, min(len(offsets), _OPEN_CHECK_SAMPLES)).astype(np.int64))
        last = int(np.argmax(offsets))
        for i in [*sample.tolist(), last]:
            key = keys[i]
            try:
                self._read_record(int(offsets[i]), key) if i == last else self._check_frame(int(offsets[i]), key)
            except RecordIOError as err:
                raise RecordIOError(f"{self.idx_path} does not match {self.uri}: {err}") from None

    def _check_frame(self, offset: int, key: Any) -> None:
        magic, lrecord = _FRAME.unpack_from(self._mapped(), offset)
        if magic != MAGIC or lrecord >> _LENGTH_BITS not in (0, 1):
            raise self._error(key, offset, "not a record boundary (no RecordIO magic / wrong part flag)")


def _parse_idx(path: str, key_type: type) -> tuple[list | np.ndarray, list | np.ndarray]:
    """Read `key<TAB>offset` lines. Integer keys take a vectorised path (42M lines in seconds)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise RecordIOError(f"{path}: line {line} is not text (byte 0x{data[err.start]:02x}): not a RecordIO "
                            "index (key<TAB>offset lines)") from None
    if key_type is int:
        lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                values = np.fromstring(text, dtype=np.int64, sep=" ")  # any whitespace separates
        except (ValueError, DeprecationWarning):
            values = None
        # NumPy saturates numbers beyond int64 silently: then the line parser says which line is wrong
        if values is not None and len(values) == 2 * lines and not (
                (values >= _MAX_OFFSET) | (values <= -_MAX_OFFSET)).any():
            return values[0::2], values[1::2]
    keys, offsets = [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError("expected 'key<TAB>offset'")
            key, offset = key_type(fields[0]), int(fields[1])
            if not 0 <= offset < _MAX_OFFSET or (key_type is int and not -_MAX_OFFSET <= key < _MAX_OFFSET):
                raise ValueError("number out of range")
            keys.append(key)
            offsets.append(offset)
        except ValueError as err:
            raise RecordIOError(f"{path}: line {number} is not 'key<TAB>offset': {line[:80]!r} ({err})") from None
    return keys, offsets


def _temp_path(final: str) -> str:
    directory, name = os.path.split(os.path.abspath(final))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def _commit(file: Any, tmp: str, final: str) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(tmp, final)


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
    return _IR.pack(*header) + s


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload). With flag > 0 the label is a float32 array of `flag` values.
    A record too short for its header raises RecordIOError (mxnet: struct.error)."""
    if len(s) < _IR.size:
        raise RecordIOError(f"a record of {len(s)} bytes is shorter than the {_IR.size}-byte IRHeader")
    header = IRHeader(*_IR.unpack_from(s))
    s = s[_IR.size:]
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
