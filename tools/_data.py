"""What the data tools share: opening a dataset directory, reading its raw samples, naming image files."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from utils.atomic import temp_dir_beside

os.environ.setdefault("GLOG_minloglevel", "2")  # dataset imports paddle
warnings.filterwarnings("ignore", message="No ccache found")


def open_dataset(path: Path, num_classes: int | None = None):
    """A RecordIODataset if `path` holds train.rec, else an ImageFolderDataset (label.txt or identity folders)."""
    from dataset import ImageFolderDataset, RecordIODataset

    cls = RecordIODataset if (path / "train.rec").exists() else ImageFolderDataset
    return cls(path, train=False, strict=True, num_classes=num_classes)


def raw_sample(ds, index: int) -> tuple[bytes, int, str]:
    """(encoded image bytes exactly as stored, label, name) of sample `index`, without decoding; an unreadable
    sample raises its error (a RecordIOError or OSError naming the file)."""
    payloads, labels = ds._samples(np.array([index]))
    if isinstance(payloads[0], Exception):
        raise payloads[0]
    return bytes(payloads[0]), int(labels[0]), ds._name(index)


def record_key(ds, index: int) -> int:
    """The .rec key of sample `index` of a RecordIODataset."""
    return int(ds._keys[index])


def image_suffix(payload: bytes) -> str:
    """File extension for an encoded image, from its magic bytes (the payload is written unchanged)."""
    if payload[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if payload[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return ".img"


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final`, on error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(final)  # its mode comes from the umask (mkdtemp: 0700)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
