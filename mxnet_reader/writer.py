"""Writing RecordIO: `RecordWriter` (sequential) and `IndexedRecordWriter` (with its `.idx`), what
`MXRecordIO(uri, "w")` and `MXIndexedRecordIO(idx, uri, "w")` open. Records are framed byte for byte as
dmlc-core writes them (mxnet_reader.recordio.encode_record); files are written under a temporary name in the
same directory and renamed into place on `close()`, so an interrupted conversion leaves the old file, never a
half-written one."""

from __future__ import annotations

import os
from typing import Any

from mxnet_reader.recordio import MXIndexedRecordIO, MXRecordIO, encode_record


class RecordWriter(MXRecordIO):
    """`write(buf)` appends a record; the file appears under `uri` when `close()` is called, and `abort()` (or
    an exception inside a `with` block) leaves `uri` as it was."""

    flag = "w"

    def __init__(self, uri: str | os.PathLike, flag: str = "w") -> None:
        super().__init__(uri, flag)

    def open(self) -> None:
        """Start a new file (under a temporary name until close())."""
        self._tmp = _temp_path(self.uri)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 -- kept open until close()
        self.is_open = True

    def close(self) -> None:
        """Flush, fsync and rename the temporary file to `uri`."""
        if self.is_open:
            self.is_open = False
            _commit(self._file, self._tmp, self.uri)

    def abort(self) -> None:
        """Discard everything written since open(); `uri` is left as it was."""
        if self.is_open:
            self.is_open = False
            self._file.close()
            os.unlink(self._tmp)

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()  # an exception while writing: keep the previous file, not a partial one
        else:
            self.close()

    def __getstate__(self) -> dict:
        raise TypeError(f"a RecordIO writer cannot be pickled ({self.uri})")

    def write(self, buf: bytes) -> None:
        """Append one record."""
        if not self.is_open:
            raise ValueError(f"{self.uri} is not open for writing")
        self._file.write(encode_record(bytes(buf)))

    def tell(self) -> int:
        """Where the next record will be written."""
        return self._file.tell()


class IndexedRecordWriter(RecordWriter, MXIndexedRecordIO):
    """`write_idx(key, buf)` appends a record and indexes it under `key` in the `.idx` (`key<TAB>offset` lines)."""

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str = "w",
                 key_type: type = int) -> None:
        MXIndexedRecordIO.__init__(self, idx_path, uri, flag, key_type)

    def open(self) -> None:
        super().open()
        self._idx_tmp = _temp_path(self.idx_path)
        self._fidx = open(self._idx_tmp, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._written: dict = {}

    def close(self) -> None:
        if self.is_open:
            _commit(self._fidx, self._idx_tmp, self.idx_path)
        super().close()

    def abort(self) -> None:
        if self.is_open:
            self._fidx.close()
            os.unlink(self._idx_tmp)
        super().abort()

    @property
    def keys(self) -> list:
        """The keys written so far, in order."""
        return list(self._written)

    def __len__(self) -> int:
        return len(self._written)

    def offset_of(self, key: Any) -> int:
        """Byte offset of `key` in the .rec file; KeyError if no record was written under it."""
        return self._written[self.key_type(key)]

    def write_idx(self, idx: Any, buf: bytes) -> None:
        """Append a record and index it under key `idx`."""
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self._fidx.write(f"{key}\t{pos}\n")
        self._written[key] = pos


def _temp_path(final: str) -> str:
    directory, name = os.path.split(os.path.abspath(final))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def _commit(file: Any, tmp: str, final: str) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(tmp, final)
