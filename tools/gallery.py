"""Build a gallery of known faces and search it.

    python tools/gallery.py build --images gallery/ --out index.npz --model exported/r50
    python tools/gallery.py search --index index.npz --query photos/ --top-k 5 --threshold 0.3 --model exported/r50

build: identity = the image's sub-folder (gallery/<identity>/<image>), or the label of a `label.txt`
(`path<space or tab>label`, paths relative to the folder). One mean embedding per identity, or every image with
--per-image. search: one JSON line per query image with the best identity (`unknown` below --threshold), its
cosine score and the top-k identities. Images are aligned 112x112 crops, photos whose face is found by the Haar
cascade (or --detector YUNET.onnx; the largest face if several), face crops embedded whole with --detect none, or
photos aligned with their 5-point --landmarks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.embedder import add_model_args, embedder_from_args
from deploy.face_detect import add_detection_args, detection_from_args
from deploy.face_files import list_images, load_crops, load_landmarks
from deploy.gallery import GalleryIndex, build_index
from utils.cli import check_writable, exit_on_user_error, finite_float, positive_int, start_program
from utils.label_file import read_label_file


def gallery_labels(root: Path) -> tuple[list[str], list[str]]:
    """(image names relative to root, identity of each) from root/label.txt or the sub-folder layout."""
    label_file = root / "label.txt"
    if label_file.is_file():
        listing = read_label_file(label_file, str)  # identities are names here, not class numbers
        if not listing.paths:
            raise ValueError(f"{label_file}: no entries")
        return listing.paths, listing.labels
    _, names = list_images(root)
    loose = [n for n in names if "/" not in n]
    if loose:
        raise ValueError(f"{root / loose[0]}: not inside an identity sub-folder (use {root}/<identity>/ or label.txt)")
    return names, [n.split("/", 1)[0] for n in names]


def build(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out}: exists (use --force to replace it)")
    check_writable(args.out)
    root = Path(args.images)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    names, labels = gallery_labels(root)
    detection = detection_from_args(args, "--landmarks")
    landmarks = load_landmarks(args.landmarks) if args.landmarks else None
    crops, kept, skipped, how = load_crops(root, names, landmarks, args.skip_bad, detection)
    for item in skipped:
        print(f"warning: skipped {item['error']}", file=sys.stderr)
    label_of = dict(zip(names, labels, strict=True))
    embedder = embedder_from_args(args)
    embeddings = embedder.embed(crops, batch_size=args.batch_size, flip=args.flip)
    crops_by = dict(Counter(how))
    meta = {**embedder.meta, "flip": args.flip, "images": len(kept), "skipped": len(skipped), "crops": crops_by}
    identities = [label_of[n] for n in kept]
    index = build_index(embeddings, identities, kept, args.per_image, meta)
    index.save(args.out, force=args.force)
    made = ", ".join(f"{n} {kind}" for kind, n in crops_by.items())
    print(f"{len(set(identities))} identities, {len(kept)} images ({made}), {index.embedding_size}-d "
          f"({'per image' if args.per_image else 'mean per identity'}) -> {args.out}")
    return 0


def search(args: argparse.Namespace) -> int:
    index = GalleryIndex.load(args.index)
    root, names = list_images(args.query)
    detection = detection_from_args(args, "--landmarks")
    landmarks = load_landmarks(args.landmarks) if args.landmarks else None
    crops, kept, skipped, _ = load_crops(root, names, landmarks, args.skip_bad, detection)
    embedder = embedder_from_args(args)
    index.check_model(embedder.embedding_size, embedder.meta, str(args.index))
    results = index.search(embedder.embed(crops, batch_size=args.batch_size, flip=args.flip), args.top_k,
                           args.threshold)
    for name, result in zip(kept, results, strict=True):
        print(json.dumps({"file": name, **result}))
    for item in skipped:
        print(json.dumps({"file": item["file"], "error": item["error"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="embed a folder of known faces into an index")
    p.add_argument("--images", required=True, help="folder: <identity>/<image> or label.txt")
    p.add_argument("--out", required=True, type=Path, help="index file to write (.npz)")
    p.add_argument("--per-image", action="store_true", help="keep every image instead of one mean per identity")
    p.add_argument("--force", action="store_true", help="overwrite an existing index")
    p.set_defaults(run=build)
    q = commands.add_parser("search", help="rank gallery identities for query images")
    q.add_argument("--index", required=True, type=Path)
    q.add_argument("--query", required=True, help="an image, a folder or a list file")
    q.add_argument("--top-k", type=positive_int, default=5, help="identities listed per query")
    q.add_argument("--threshold", type=finite_float(-1, 1), default=0.3,
                   help="cosine score (-1 to 1) below which a face is 'unknown'")
    q.set_defaults(run=search)
    for sub in (p, q):
        sub.add_argument("--landmarks", help="5-point landmarks per image (JSON or text) to align full images")
        sub.add_argument("--skip-bad", action="store_true", help="skip unreadable/unalignable images with a warning")
        add_detection_args(sub, one_face=True)
        add_model_args(sub)
    args = parser.parse_args(argv)
    return exit_on_user_error(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
