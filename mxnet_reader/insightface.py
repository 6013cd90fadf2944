"""InsightFace's training-set layout (what `face2rec2.py` writes and arcface_torch reads): its writer, and what a
reader needs to know of it (which keys are images, the `property` file).

Keys 1..n are the images (IRHeader(0, label, key, 0), payload = the encoded image as given), key 0 is the
header record with label [n+1, n+1+C], keys n+1..n+C are one record per identity with label [start, end)
of its image keys. Physical order is images, key 0, identities -- face2rec2's order -- so a set written
here is byte-identical to mxnet's for the same payloads. `property` holds "num_classes,height,width".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mxnet_reader.reader import IndexedRecordReader
from mxnet_reader.recordio import IRHeader, RecordIOError, pack
from mxnet_reader.writer import IndexedRecordWriter
from utils.atomic import write_text_atomic


def write_insightface_rec(out_dir: str | Path, samples: Iterable[tuple[int, bytes]], *,
                          image_size: tuple[int, int] = (112, 112), total: int | None = None,
                          progress: bool = True, desc: str = "writing train.rec") -> int:
    """Write `samples` -- (label, encoded image bytes), labels sorted and contiguous from 0 -- as
    out_dir/train.rec, train.idx and property. Returns the number of identities.

    Nothing under the final names changes until every record is written (the RecordIO writer renames its
    temp files on close); a bad label aborts the write and raises ValueError naming the sample.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = IndexedRecordWriter(out_dir / "train.idx", out_dir / "train.rec")
    starts: list[int] = []  # first image key of each identity
    key = 0
    try:
        for label, payload in tqdm(samples, total=total, desc=desc, unit="img", disable=not progress):
            label = int(label)
            if label != len(starts) - 1:
                if label != len(starts):
                    raise ValueError(f"sample {key}: label {label} breaks the order; labels must run 0, 1, 2, ... "
                                     f"without gaps, grouped by identity (previous label {len(starts) - 1})")
                starts.append(key + 1)
            key += 1
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), payload))
        if key == 0:
            raise ValueError(f"no images to write to {out_dir}")
        first_identity_key = key + 1
        writer.write_idx(0, pack(IRHeader(0, [first_identity_key, first_identity_key + len(starts)], 0, 0), b""))
        for i, (start, end) in enumerate(zip(starts, [*starts[1:], key + 1], strict=True)):
            identity_key = first_identity_key + i
            writer.write_idx(identity_key, pack(IRHeader(0, [start, end], identity_key, 0), b""))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    write_text_atomic(out_dir / "property", f"{len(starts)},{image_size[0]},{image_size[1]}\n")
    return len(starts)


def image_keys(reader: IndexedRecordReader) -> tuple[range | np.ndarray, int | None]:
    """(keys of the image records, number of identity records or None) of an opened set.

    With a header record 0 (label [a, b]) the images are keys 1..a-1 and the identities keys a..b-1; the
    float32 bounds are exact only below 2^24, so they are pinned against the index and the records around
    them (WebFace42M has 42M keys). Without one (shuffled sets) the images are the index keys in file order.
    """
    if 0 not in reader:
        return reader.key_array, None
    header, payload = reader.read_header(0)
    if header.flag < 2 or payload:
        return reader.key_array, None
    first, end = (float(x) for x in header.label[:2])
    top = int(reader.key_array.max()) + 1
    if not 1 <= first <= end <= top + np.spacing(np.float32(top)):  # NaN fails too
        raise RecordIOError(f"{reader.uri} key 0: the header record's key range [{first:.0f}, {end:.0f}) is not "
                            f"inside the index {reader.idx_path} (keys end at {top - 1})")
    first_identity = _pinned_bound(reader, first, lambda k: _is_header_record(reader, k), "image")
    end = _pinned_bound(reader, end, lambda k: k not in reader, "identity")
    if not reader.covers(1, first_identity):
        raise RecordIOError(f"{reader.idx_path}: the header record 0 says keys 1..{first_identity - 1} are images, "
                            "but some of them are not in the index")
    return range(1, first_identity), end - first_identity


def _is_header_record(reader: IndexedRecordReader, key: int) -> bool:
    """Identity (and header) records carry a label range and no image; keys past the index count too."""
    if key not in reader:
        return True
    header, payload = reader.read_header(key)
    return header.flag >= 2 and not payload


def _pinned_bound(reader: IndexedRecordReader, approx: float, is_past: Callable[[int], bool], what: str) -> int:
    bound = exact_bound(approx, is_past)
    if bound is None:
        raise RecordIOError(f"{Path(reader.uri).parent}: header record 0 puts the end of the {what} records at key "
                            f"{approx:.0f}, but the index and records disagree within float32 rounding of it")
    return bound


def exact_bound(approx: float, is_past: Callable[[int], bool]) -> int | None:
    """The key k with is_past(k) and not is_past(k - 1) within float32 rounding of `approx`, or None.

    Header records store key bounds as float32, exact only below 2^24: 42,474,557 reads back as 42,474,556.
    """
    spacing = int(np.spacing(np.float32(approx)))
    for k in range(max(1, int(approx) - spacing), int(approx) + spacing + 1):
        if is_past(k) and not is_past(k - 1):
            return k
    return None


def read_property(root: str | Path) -> int | None:
    """num_classes from the `property` file (`num_classes,height,width`), if there is one."""
    path = Path(root) / "property"
    if not path.is_file():
        return None
    text = path.read_bytes().decode("utf-8-sig", errors="replace").strip()
    try:
        return int(text.split(",")[0])
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {text[:60]!r}") from None
