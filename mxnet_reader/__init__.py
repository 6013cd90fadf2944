"""Read and write mxnet RecordIO (.rec/.idx) without mxnet: `from mxnet_reader import recordio` replaces
`from mxnet import recordio` in a script. Reader and writer are separate classes (mxnet_reader.reader,
mxnet_reader.writer); mxnet's `MXRecordIO(uri, flag)` and `MXIndexedRecordIO(idx, uri, flag)` pick one by flag."""

from mxnet_reader import recordio
from mxnet_reader.reader import IndexedRecordReader, RecordReader
from mxnet_reader.recordio import (
    MAGIC,
    IRHeader,
    MXIndexedRecordIO,
    MXRecordIO,
    RecordIOError,
    encode_record,
    pack,
    pack_img,
    unpack,
    unpack_img,
)
from mxnet_reader.writer import IndexedRecordWriter, RecordWriter

__all__ = [
    "MAGIC",
    "IRHeader",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "encode_record",
    "pack",
    "pack_img",
    "recordio",
    "unpack",
    "unpack_img",
]
