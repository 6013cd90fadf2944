"""Extract an InsightFace `train.rec` to image files: OUT/images/<label>/<key>.jpg + OUT/label.txt.

    python tools/rec2images.py /data/ms1m-retinaface OUT

Each image is the record's payload written unchanged (byte-exact, no re-encoding). label.txt lists
`images/<label>/<key>.jpg<TAB><label>`, which ImageFolderDataset and tools/images2rec.py read back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from tools._data import image_suffix, open_dataset, staged_dir
from utils.cli import exit_on_user_error, start_program


def rec_to_images(data_dir: Path, out_dir: Path, progress: bool = True) -> tuple[int, int]:
    """Write every image record of `data_dir` under `out_dir` (built aside, renamed into place).
    Returns (images, identities)."""
    ds = open_dataset(data_dir)
    lines, labels = [], set()
    with staged_dir(out_dir) as tmp:
        for i in tqdm(range(len(ds)), desc=f"rec2images {data_dir.name}", unit="img", disable=not progress):
            payload, label, _ = ds.raw_sample(i)
            if label not in labels:
                (tmp / "images" / str(label)).mkdir(parents=True, exist_ok=True)
                labels.add(label)
            name = f"images/{label}/{ds.record_key(i)}{image_suffix(payload)}"
            (tmp / name).write_bytes(payload)
            lines.append(f"{name}\t{label}\n")
        (tmp / "label.txt").write_text("".join(lines), encoding="utf-8")
    return len(lines), len(labels)


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="directory holding train.rec and train.idx")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")
    if not (args.data_dir / "train.rec").is_file():
        parser.error(f"{args.data_dir / 'train.rec'} not found")
    return exit_on_user_error(lambda: report(args.data_dir, args.out))


def report(data_dir: Path, out: Path) -> int:
    images, identities = rec_to_images(data_dir, out)
    print(f"{data_dir} -> {out}: {images} images of {identities} identities, list in label.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
