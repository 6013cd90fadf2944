"""Pack aligned face crops into an InsightFace `train.rec`/`train.idx` + `property` (what train.py reads).

    python tools/images2rec.py my_faces/ my_dataset/          # my_faces/<identity>/<image>.jpg
    python tools/images2rec.py extracted/ again/              # or a folder with label.txt (path<TAB>label)

Labels are remapped to 0..K-1 in sorted order of the original identity (folder name or label.txt label),
images keep their listing order within an identity;
OUT/label_map.json maps each new label back. JPEG and PNG files of 112x112 are stored byte-exact; anything
else (another format or size) is decoded, resized to 112x112 and re-encoded as JPEG (quality --quality),
and the tool says how many.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np

from mxnet_reader.insightface import write_insightface_rec
from tools._data import image_suffix
from utils.atomic import write_text_atomic
from utils.cli import exit_on_user_error, start_program
from utils.image import INPUT_SIZE, decode_rgb


def _stored_payload(payload: bytes, name: str, quality: int) -> tuple[bytes, bool]:
    """(bytes to store, re-encoded?): the original unless it is not a 112x112 JPEG/PNG."""
    try:
        img = decode_rgb(payload)
    except ValueError:
        raise ValueError(f"{name}: not a decodable image") from None
    if image_suffix(payload) in (".jpg", ".png") and img.shape[:2] == (INPUT_SIZE, INPUT_SIZE):
        return payload, False
    if img.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
        shrink = img.shape[0] > INPUT_SIZE
        img = cv2.resize(img, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"{name}: could not re-encode as JPEG")
    return buf.tobytes(), True


def images_to_rec(image_dir: Path, out_dir: Path, quality: int = 95, progress: bool = True) -> dict:
    """Write out_dir/train.rec, train.idx, property and label_map.json; returns a summary dict."""
    from dataset import image_folder_listing

    if (image_dir / "train.rec").exists():
        raise ValueError(f"{image_dir} holds a train.rec; images2rec reads image folders")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    paths, labels, _ = image_folder_listing(image_dir)  # any labels: they are renumbered, not used as classes
    if not paths:
        raise ValueError(f"no images found in {image_dir}")
    from_folders = not (image_dir / "label.txt").is_file()
    identity = [path.split("/", 1)[0] for path in paths] if from_folders else labels
    originals = sorted(set(identity))
    new_label = {orig: i for i, orig in enumerate(originals)}
    order = sorted(range(len(paths)), key=lambda i: new_label[identity[i]])  # stable: listing order kept
    re_encoded = 0

    def records():
        nonlocal re_encoded
        for i in order:
            path = image_dir / paths[i]
            stored, changed = _stored_payload(path.read_bytes(), str(path), quality)
            re_encoded += changed
            yield new_label[identity[i]], stored

    num_classes = write_insightface_rec(out_dir, records(), total=len(order), progress=progress,
                                        desc=f"images2rec {image_dir.name}")
    write_text_atomic(out_dir / "label_map.json", json.dumps(
        {"source": "folder name" if from_folders else "label.txt label",
         "labels": {str(i): orig for i, orig in enumerate(originals)}}, indent=1) + "\n")
    counts = np.bincount([new_label[x] for x in identity], minlength=num_classes)
    return {"images": len(order), "identities": num_classes, "re_encoded": re_encoded,
            "min_per_identity": int(counts.min()), "max_per_identity": int(counts.max())}


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", type=Path, help="<identity>/<image> folders, or a folder with label.txt")
    parser.add_argument("out", type=Path, help="output directory for train.rec, train.idx, property, label_map.json")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for images that must be re-encoded")
    parser.add_argument("--force", action="store_true", help="overwrite an existing train.rec in the output")
    args = parser.parse_args(argv)
    if (args.out / "train.rec").exists() and not args.force:
        parser.error(f"{args.out / 'train.rec'} exists; pass --force to overwrite")
    return exit_on_user_error(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    s = images_to_rec(args.image_dir, args.out, args.quality)
    print(f"{args.image_dir} -> {args.out}: {s['images']} images of {s['identities']} identities "
          f"({s['min_per_identity']}-{s['max_per_identity']} per identity); label map in label_map.json")
    if s["re_encoded"]:
        print(f"note: {s['re_encoded']} images were not 112x112 JPEG/PNG and were resized/re-encoded as JPEG "
              f"(quality {args.quality}); the rest are stored byte-exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
