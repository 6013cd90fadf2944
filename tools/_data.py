"""What the data tools share: opening a dataset directory strictly, naming image files, staging an output folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from utils.atomic import temp_dir_beside


def open_dataset(path: Path, num_classes: int | None = None):
    """The set at `path` as the tools read it: strict (a bad sample is an error) and without flips."""
    from dataset import open_dataset as open_training_set

    return open_training_set(path, train=False, strict=True, num_classes=num_classes)


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
