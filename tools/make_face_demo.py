"""Make a recognition demo from the built-in synthetic faces: a gallery, a group photo and its face list.

    python tools/make_face_demo.py --out demo/ --identities 4
    python tools/gallery.py build --images demo/gallery --out demo/index.npz --model exported/mbf
    python tools/recognize.py --image demo/photo.png --faces demo/faces.json --index demo/index.npz \
        --out demo/annotated.png --model exported/mbf

Writes gallery/<identity>/<n>.png (aligned 112x112 crops), photo.png (new images of every known identity and
of one stranger pasted at several sizes on a textured background), faces.json (each face's box and 5 landmarks,
what a detector would return) and truth.json (who is where, for tests).
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

from utils.atomic import write_output
from utils.cli import exit_on_user_error
from utils.faces import render_face, sample_identity

UNKNOWN_NAME = "stranger"


def make_demo(out: Path, identities: int = 4, gallery_images: int = 5, seed: int = 0, force: bool = False) -> None:
    """Write the gallery, photo.png, faces.json and truth.json into `out`."""
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (use --force)")
    rng = np.random.default_rng(seed)
    people = [sample_identity(rng) for _ in range(identities + 1)]  # the last one is not in the gallery
    names = [f"person_{i:02d}" for i in range(identities)]
    for name, person in zip(names, people, strict=False):
        for j in range(gallery_images):
            img, _ = render_face(person, rng)
            _, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            write_output(out / "gallery" / name / f"{j}.png", png.tobytes(), force=force)

    sizes = rng.integers(120, 200, len(people))
    height, width = int(sizes.max()) + 80, int(sizes.sum()) + 40 * (len(people) + 1)
    noise = rng.uniform(60, 200, (height // 40 + 1, width // 40 + 1, 3)).astype(np.float32)
    photo = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    faces, truth, x = [], [], 40
    for i, (person, size) in enumerate(zip(people, sizes, strict=True)):
        img, marks = render_face(person, rng, size=int(size))
        y = int(rng.integers(20, height - size - 20 + 1))
        photo[y:y + size, x:x + size] = img
        faces.append({"box": [x, y, x + int(size), y + int(size)],
                      "landmarks": np.round(marks + np.array([x, y], np.float32), 2).tolist()})
        truth.append(names[i] if i < identities else UNKNOWN_NAME)
        x += int(size) + 40
    _, encoded = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    write_output(out / "photo.png", encoded.tobytes(), force=force)
    write_output(out / "faces.json", (json.dumps(faces, indent=1) + "\n").encode(), force=force)
    write_output(out / "truth.json", (json.dumps(truth) + "\n").encode(), force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the demo into")
    parser.add_argument("--identities", type=int, default=4, help="known people (one stranger is added)")
    parser.add_argument("--gallery-images", type=int, default=5, help="gallery images per known person")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite files in a non-empty --out")
    args = parser.parse_args(argv)
    return exit_on_user_error(lambda: make_and_report(args))


def make_and_report(args: argparse.Namespace) -> int:
    make_demo(args.out, args.identities, args.gallery_images, args.seed, args.force)
    print(f"{args.identities} known + 1 unknown faces -> {args.out}/photo.png, faces.json, gallery/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
