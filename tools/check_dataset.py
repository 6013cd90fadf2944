"""Validate a training set before a long run: a train.rec/train.idx directory or an image folder.

    python tools/check_dataset.py /data/ms1m-retinaface
    python tools/check_dataset.py my_faces/ --no-decode

Reports image and identity counts, the label range against num_classes, unreadable or undecodable records,
images that are not 112x112, identities without images, and a histogram of images per identity.
Exit status 0 when no problem is found, 1 otherwise (2 for usage errors).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from tqdm import tqdm

from tools._data import open_dataset
from utils.cli import start_program
from utils.image import INPUT_SIZE, decode_rgb

HISTOGRAM_EDGES = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500)
MAX_LISTED = 10  # problems of one kind printed in full; the rest are counted


def check(path: Path, decode: bool = True, num_classes: int | None = None, progress: bool = True) -> dict:
    """Scan every sample; returns counts, the per-identity histogram and a list of problem strings."""
    try:
        ds = open_dataset(path, num_classes)
    except (OSError, ValueError) as e:  # missing files, truncated .rec, bad index or label.txt, empty set
        return {"problems": [f"cannot open: {e}"]}
    problems: dict[str, list[str]] = {"unreadable": [], "undecodable": [], "label out of range": [],
                                      f"not {INPUT_SIZE}x{INPUT_SIZE}": []}
    labels = []
    for i in tqdm(range(len(ds)), desc=f"check {path.name}", unit="img", disable=not progress):
        try:
            payload, label, name = ds.raw_sample(i)
        except (OSError, ValueError) as e:
            problems["unreadable"].append(f"sample {i}: {e}")
            continue
        labels.append(label)
        if not 0 <= label < ds.num_classes:
            problems["label out of range"].append(f"{name}: label {label} not in [0, {ds.num_classes})")
        if decode:
            try:
                shape = decode_rgb(payload).shape
            except ValueError:
                problems["undecodable"].append(name)
                continue
            if shape[:2] != (INPUT_SIZE, INPUT_SIZE):
                problems[f"not {INPUT_SIZE}x{INPUT_SIZE}"].append(f"{name} is {shape[1]}x{shape[0]}")
    # nothing here is sized by num_classes: --num-classes is typed by hand
    present, counts = np.unique(np.array([x for x in labels if 0 <= x < ds.num_classes], dtype=np.int64),
                                return_counts=True)
    kind = "identities without images"
    totals = {kind: ds.num_classes - len(present)}
    if totals[kind]:
        problems[kind] = [f"label {x}" for x in _first_missing(present, ds.num_classes, MAX_LISTED)]
    edges = [*HISTOGRAM_EDGES, max(int(counts.max(initial=0)) + 1, HISTOGRAM_EDGES[-1] + 1)]
    histogram = {(f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}"): int(((counts >= lo) & (counts < hi)).sum())
                 for lo, hi in itertools.pairwise(edges)}
    listed = []
    for kind, items in problems.items():
        total = totals.get(kind, len(items))
        listed += [f"{kind}: {item}" for item in items[:MAX_LISTED]]
        if total > MAX_LISTED:
            listed.append(f"{kind}: ... and {total - MAX_LISTED} more ({total} in all)")
    return {"kind": type(ds).__name__, "images": len(ds), "readable": len(labels), "num_classes": ds.num_classes,
            "identities": len(present),
            "label_min": min(labels, default=None), "label_max": max(labels, default=None),
            "histogram": histogram, "problems": listed}


def _first_missing(present: np.ndarray, num_classes: int, count: int) -> list[int]:
    """The first `count` labels in [0, num_classes) that are not in the sorted array `present`."""
    present, missing, label = present.tolist(), [], 0
    j = 0
    while label < num_classes and len(missing) < count:
        if j < len(present) and present[j] == label:
            j += 1
        else:
            missing.append(label)
        label += 1
    return missing


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="directory with train.rec/train.idx, or an image folder")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding (faster; finds fewer problems)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="expected number of identities (default: property file / header / largest label + 1)")
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    report = check(args.path, decode=not args.no_decode, num_classes=args.num_classes)
    if "images" in report:
        print(f"{args.path} ({report['kind']}): {report['images']} images, {report['identities']} identities "
              f"with images, num_classes {report['num_classes']}, labels {report['label_min']}..{report['label_max']}")
        print("images per identity: " + ", ".join(f"{k}: {v}" for k, v in report["histogram"].items() if v))
    for problem in report["problems"]:
        print(f"PROBLEM {problem}")
    print("OK" if not report["problems"] else f"{len(report['problems'])} problem line(s)")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
