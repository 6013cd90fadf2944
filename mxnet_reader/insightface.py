"""Write a training set in InsightFace's layout (what `face2rec2.py` writes and arcface_torch reads).

Keys 1..n are the images (IRHeader(0, label, key, 0), payload = the encoded image as given), key 0 is the
header record with label [n+1, n+1+C], keys n+1..n+C are one record per identity with label [start, end)
of its image keys. Physical order is images, key 0, identities -- face2rec2's order -- so a set written
here is byte-identical to mxnet's for the same payloads. `property` holds "num_classes,height,width".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from mxnet_reader.recordio import IRHeader, MXIndexedRecordIO, pack
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
    writer = MXIndexedRecordIO(out_dir / "train.idx", out_dir / "train.rec", "w")
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
