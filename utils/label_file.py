"""The one reader of `label.txt` image listings (training image folders, images2rec, check_dataset, gallery).

One `relative/path<TAB or spaces>label` per line; blank lines are skipped. A UTF-8 byte-order mark (what
Windows Notepad writes) is dropped and CRLF line ends are accepted, so the first path is never `'\\ufeffimg...'`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

Label = TypeVar("Label")


class LabelListing(NamedTuple):
    paths: list[str]   # relative image paths, in file order
    labels: list       # one label per path, as `label_type` made it
    lines: list[int]   # the 1-based line of each entry, for messages


def read_label_file(path: str | Path, label_type: Callable[[str], Label] = int) -> LabelListing:
    """Parse a label file; a line that does not parse raises ValueError naming the file and line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x})") from None
    listing = LabelListing([], [], [])
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        fields = line.rsplit(None, 1)
        try:
            if len(fields) != 2:
                raise ValueError
            label = label_type(fields[1])
        except ValueError:
            raise ValueError(f"{path}: line {number} is not 'path<TAB>label': {line.rstrip()[:80]!r}") from None
        listing.paths.append(fields[0].strip())
        listing.labels.append(label)
        listing.lines.append(number)
    return listing
