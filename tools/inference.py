"""Face embeddings for an image, a folder or a list file, with any backend (dygraph, Paddle Inference, ONNX).

    python tools/inference.py --model exported/r50 --input faces/ --output faces_emb
    python tools/inference.py --network r50 --weights backbone.pdparams --input photos/ --landmarks marks.json \
        --output photos_emb

Inputs are aligned 112x112 crops, photos whose face is found by the Haar cascade (or --detector YUNET.onnx; the
largest face if several), face crops embedded whole with --detect none, or photos with 5-point landmarks
(--landmarks, JSON or text), aligned to the ArcFace template. Writes OUTPUT.npy (N x D float32, L2-normalised
unless --raw) and OUTPUT.json (the files in row order, how each was cropped, skipped files, model metadata). An
unreadable image or one without a face stops the run with its name and nothing is written, unless --skip-bad,
which leaves it out and lists it in the JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from deploy.embedder import add_model_args, embedder_from_args, l2_normalize
from deploy.face_detect import add_detection_args, detection_from_args
from deploy.face_files import list_images, load_crops, load_landmarks
from utils.atomic import write_output
from utils.cli import check_writable, exit_on_user_error, start_program


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="an image, a folder of images or a list file (.txt)")
    parser.add_argument("--output", required=True, type=Path, help="output prefix: writes PREFIX.npy + PREFIX.json")
    parser.add_argument("--landmarks", help="5-point landmarks per image (JSON or text) to align full images")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable/unalignable images with a warning")
    parser.add_argument("--raw", action="store_true", help="write embeddings as the network outputs them")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_detection_args(parser, one_face=True)
    add_model_args(parser)
    return exit_on_user_error(lambda: embed_files(parser.parse_args(argv)))


def embed_files(args: argparse.Namespace) -> int:
    npy_path, json_path = (args.output.with_name(args.output.name + suffix) for suffix in (".npy", ".json"))
    for path in (npy_path, json_path):
        if path.exists() and not args.force:
            raise FileExistsError(f"{path}: exists (use --force to replace it)")
        check_writable(path)
    root, names = list_images(args.input)
    detection = detection_from_args(args, "--landmarks")
    landmarks = load_landmarks(args.landmarks) if args.landmarks else None
    crops, kept, skipped, how = load_crops(root, names, landmarks, args.skip_bad, detection)
    embedder = embedder_from_args(args)
    embeddings = embedder.embed(crops, batch_size=args.batch_size, flip=args.flip)
    for item in skipped:
        print(f"warning: skipped {item['error']}", file=sys.stderr)
    if not args.raw:
        embeddings = l2_normalize(embeddings)
    buf = io.BytesIO()
    np.save(buf, embeddings.astype(np.float32), allow_pickle=False)
    listing = {"root": str(root), "files": kept, "crops": how, "skipped": skipped, "normalized": not args.raw,
               "flip": args.flip, "aligned_with_landmarks": landmarks is not None, "backend": embedder.backend,
               "model": embedder.meta}
    write_output(npy_path, buf.getvalue(), force=args.force)
    write_output(json_path, (json.dumps(listing, indent=1) + "\n").encode(), force=args.force)
    print(f"{len(kept)} embeddings ({embeddings.shape[1]}-d, {embedder.backend}) -> {npy_path}, {json_path}"
          + (f"; {len(skipped)} skipped" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
