"""Reading RecordIO: `RecordReader` (sequential) and `IndexedRecordReader` (random access through the `.idx`),
what `MXRecordIO(uri, "r")` and `MXIndexedRecordIO(idx, uri, "r")` open. See mxnet_reader.recordio for the
format and how these differ from mxnet's (memory-mapped reads, NumPy index, checked framing)."""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mxnet_reader.recordio import (
    FRAME,
    IR_STRUCT,
    LENGTH_BITS,
    MAGIC,
    MAGIC_BYTES,
    MAX_LENGTH,
    IRHeader,
    MXIndexedRecordIO,
    MXRecordIO,
    RecordIOError,
    padded,
    unpack,
)

_MAX_OFFSET = 1 << 62  # keys and offsets beyond this are not from a real index (and would overflow int64)
_OPEN_CHECK_SAMPLES = 256  # offsets whose magic is checked when an index is opened (every read checks its own)


class RecordReader(MXRecordIO):
    """`read()` returns the next record's bytes, or None at the end of the file. The file is mapped read-only on
    first use; forked workers share the map, and a pickled reader (spawn) maps the file anew."""

    flag = "r"

    def __init__(self, uri: str | os.PathLike, flag: str = "r") -> None:
        super().__init__(uri, flag)

    def open(self) -> None:
        """Open for reading (the file is mapped on first use)."""
        self._map: mmap.mmap | bytes | None = None
        self._view: memoryview | None = None
        self._pos = 0
        if not os.path.isfile(self.uri):
            raise FileNotFoundError(f"RecordIO file not found: {self.uri}")
        self._size = os.path.getsize(self.uri)
        self.is_open = True

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self._release_handle()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_map", "_view")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map = self._view = None

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
            if pos + FRAME.size > len(data):
                raise self._error(key, pos, "truncated file: it ends inside a record header")
            magic, lrecord = FRAME.unpack_from(data, pos)
            cflag, length = lrecord >> LENGTH_BITS, lrecord & MAX_LENGTH
            if magic != MAGIC or cflag not in ((2, 3) if parts else (0, 1)):
                raise self._error(key, pos, "not a record boundary (no RecordIO magic / wrong part flag)")
            start = pos + FRAME.size
            if start + length > len(data):
                raise self._error(key, pos, f"truncated file: the record needs {length} bytes after its header")
            pos = start + padded(length)
            if cflag == 0:
                return data[start:start + length], pos
            parts.append(data[start:start + length])
            if cflag == 3:
                return MAGIC_BYTES.join(parts), pos

    def read(self) -> bytes | None:
        """The next record, or None at the end of the file."""
        if self._pos >= self._size:
            return None
        data, self._pos = self._read_record(self._pos)
        return bytes(data)

    def tell(self) -> int:
        """Where the next record will be read."""
        return self._pos


class IndexedRecordReader(RecordReader, MXIndexedRecordIO):
    """Random access by key: `read_idx(key)`, and beyond mxnet `read_idx_view`, `read_header`, `read_images`
    (a batch of image records with NumPy gathers) and `covers`."""

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str = "r",
                 key_type: type = int) -> None:
        MXIndexedRecordIO.__init__(self, idx_path, uri, flag, key_type)

    def open(self) -> None:
        super().open()
        self._keys_list: list | None = None
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

    @property
    def keys(self) -> list:
        """All keys in index-file order (a list, as in mxnet)."""
        if self._keys_list is None:
            self._keys_list = self._key_array.tolist() if self._lookup is None else list(self._key_array)
        return self._keys_list

    @property
    def key_array(self) -> np.ndarray:
        """Integer keys in index-file order as an int64 array (no Python list of 42M ints)."""
        if self._lookup is not None:
            raise TypeError("key_array needs a reader with integer keys")
        return self._key_array

    def __len__(self) -> int:
        return len(self._key_array)

    def offset_of(self, key: Any) -> int:
        """Byte offset of `key` in the .rec file; KeyError if the index has no such key."""
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
        length = lrecord & MAX_LENGTH
        start, end = offsets + FRAME.size + IR_STRUCT.size + 4 * flag, offsets + FRAME.size + length
        plain = (magic == MAGIC) & (lrecord >> LENGTH_BITS == 0) & (flag >= 0) & (start <= end) & (end <= len(data))
        labels = np.where(flag == 0, label, first_of_many).astype(np.uint32).view(np.float32).astype(np.float64)
        payloads = [data[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]
        for j in np.flatnonzero(~plain).tolist():
            key, offset = keys[j].item(), int(offsets[j])
            header, payloads[j] = self._unpacked(self._read_record(offset, key)[0], key, offset)
            labels[j] = header.label if header.flag == 0 else header.label[0]
        return labels, payloads

    def _offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """offset_of for many keys; the integer keys of an InsightFace index in one NumPy step."""
        if self._first_key is not None and keys.dtype.kind in "iu":
            rows = keys.astype(np.int64) - self._first_key
            missing = (rows < 0) | (rows >= len(self._sorted_offsets))
            if missing.any():
                raise KeyError(f"key {keys[missing][0]} not in {self.idx_path}")
            return self._sorted_offsets[rows]
        return np.array([self.offset_of(key) for key in keys.tolist()], dtype=np.int64)

    def _validate_offsets(self, keys: Any, offsets: np.ndarray) -> None:
        """Cheap, sound checks at open: alignment and bounds of every offset, the magic at a spread sample of
        offsets, and a complete last record. Every later read checks its own framing."""
        if len(offsets) == 0:
            return
        bad = np.flatnonzero((offsets % 4 != 0) | (offsets < 0) | (offsets > self._size - FRAME.size))
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
        magic, lrecord = FRAME.unpack_from(self._mapped(), offset)
        if magic != MAGIC or lrecord >> LENGTH_BITS not in (0, 1):
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
