"""Read and write mxnet RecordIO (.rec/.idx) without mxnet: `from mxnet_reader import recordio` replaces
`from mxnet import recordio` in a script."""

from mxnet_reader import recordio
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

__all__ = [
    "MAGIC",
    "IRHeader",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "RecordIOError",
    "encode_record",
    "pack",
    "pack_img",
    "recordio",
    "unpack",
    "unpack_img",
]
