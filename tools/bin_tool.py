"""Convert InsightFace `.bin` verification sets to an image folder + pairs.txt and back, byte-exact both ways.

    python tools/bin_tool.py unpack lfw.bin lfw_images/          # 00000.jpg ... + pairs.txt
    python tools/bin_tool.py pack lfw_images/ lfw_again.bin      # same pairs, same image bytes

pairs.txt has one pair per line, `<image A> <image B> <1 if same person else 0>`, paths relative to the
folder. Packing your own photos into a `.bin` works the same way: write a pairs.txt beside them (aligned
112x112 crops; other sizes are resized with a warning when the set is loaded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from eval.bin_io import read_bin, write_bin
from tools._data import image_suffix, staged_dir
from utils.cli import exit_on_user_error, start_program
from utils.image import decode_rgb

PAIRS_FILE = "pairs.txt"


def unpack(bin_path: Path, out_dir: Path, progress: bool = True) -> int:
    """Write every image of `bin_path` to `out_dir` as 00000.jpg ... and the pairs to pairs.txt; returns pairs.

    The folder is built under a temp name and renamed into place, so a failure leaves nothing half-written.
    """
    bins, issame = read_bin(bin_path)
    width = max(5, len(str(len(bins) - 1)))
    names = [f"{i:0{width}d}{image_suffix(b)}" for i, b in enumerate(bins)]
    with staged_dir(out_dir) as tmp:
        for name, payload in zip(tqdm(names, desc=f"unpack {bin_path.name}", unit="img", disable=not progress),
                                 bins, strict=True):
            (tmp / name).write_bytes(payload)
        lines = [f"{names[2 * i]} {names[2 * i + 1]} {int(same)}\n" for i, same in enumerate(issame)]
        (tmp / PAIRS_FILE).write_text("".join(lines), encoding="utf-8")
    return len(issame)


def read_pairs(folder: Path) -> tuple[list[Path], list[bool]]:
    """Parse folder/pairs.txt -> (2N image paths, N issame), with one-line errors naming the line."""
    pairs_path = folder / PAIRS_FILE
    if not pairs_path.is_file():
        raise FileNotFoundError(f"{pairs_path} not found: a pairs list '<image A> <image B> <0|1>' per line is needed")
    paths, issame = [], []
    for lineno, line in enumerate(pairs_path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise ValueError(f"{pairs_path}:{lineno}: expected '<image A> <image B> <0|1>', got {line.strip()!r}")
        for name in fields[:2]:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{pairs_path}:{lineno}: image {name} not found in {folder}")
            paths.append(folder / name)
        issame.append(fields[2] == "1")
    if not issame:
        raise ValueError(f"{pairs_path} lists no pairs")
    return paths, issame


def pack(folder: Path, bin_path: Path, progress: bool = True) -> int:
    """Build `bin_path` from folder/pairs.txt and the images it names (bytes stored as they are); returns pairs."""
    paths, issame = read_pairs(folder)
    payloads = []
    for path in tqdm(paths, desc=f"pack {bin_path.name}", unit="img", disable=not progress):
        payload = path.read_bytes()
        try:
            decode_rgb(payload)
        except ValueError:
            raise ValueError(f"{path}: not a decodable image") from None
        payloads.append(payload)
    write_bin(bin_path, payloads, issame)
    return len(issame)


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_unpack = sub.add_parser("unpack", help=".bin -> folder of images + pairs.txt")
    p_unpack.add_argument("bin", type=Path, help="input .bin")
    p_unpack.add_argument("out", type=Path, help="output folder")
    p_pack = sub.add_parser("pack", help="folder with pairs.txt -> .bin")
    p_pack.add_argument("folder", type=Path, help="folder holding pairs.txt and the images")
    p_pack.add_argument("out", type=Path, help="output .bin")
    for p in (p_unpack, p_pack):
        p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to overwrite")
    return exit_on_user_error(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.command == "unpack":
        n = unpack(args.bin, args.out)
        print(f"{args.bin} -> {args.out}: {2 * n} images, {n} pairs in {args.out / PAIRS_FILE}")
    else:
        n = pack(args.folder, args.out)
        print(f"{args.folder} -> {args.out}: {n} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
