"""Generate a small IJB-format set from synthetic faces: the real file layout, for tests and dry runs of eval.ijb.

    python -m eval.make_ijb --out DIR --target IJBC --identities 8 --templates-per-id 3 --seed 0

Each identity (utils/faces.py) gets several templates; a template holds 1-3 media (a still or a video) and a media
1-3 frames. Every frame is a synthetic face pasted, rotated and scaled, into a larger "loose crop" with a random
background, and its 5 landmarks are mapped into that crop -- so eval.ijb has to align it, as on the real data.
All template pairs are listed (genuine = same identity). The output directory is written atomically.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np

from utils.atomic import atomic_output_dir
from utils.faces import render_face, sample_identity

JPEG_QUALITY = 95


def loose_crop(face: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste an aligned face into a larger image at a random rotation, scale and offset -> (image, landmarks)."""
    size = int(rng.integers(150, 231))
    scale, angle = rng.uniform(0.9, 1.5), rng.uniform(-20, 20)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.08, 0.08, 2) * size
    matrix = cv2.getRotationMatrix2D((56.0, 56.0), angle, scale)
    matrix[:, 2] += centre - 56.0
    background = cv2.resize(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8), (size, size))
    warped = cv2.warpAffine(face, matrix, (size, size), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full(face.shape[:2], 255, np.uint8), matrix, (size, size)) > 127
    image = np.where(mask[..., None], warped, background)
    return image, landmarks @ matrix[:, :2].T + matrix[:, 2]


def generate(out_dir: str | Path, target: str = "IJBC", identities: int = 8, templates_per_id: int = 3,
             seed: int = 0, overwrite: bool = False) -> Path:
    """Write meta/<target>_{face_tid_mid,name_5pts_score,template_pair_label}.txt and loose_crop/*.jpg.

    Built in a temp directory beside `out_dir` and renamed into place; an existing `out_dir` is an error unless
    `overwrite`, and is only removed once the new set is complete.
    """
    if identities < 2 or templates_per_id < 2:
        raise ValueError("need >= 2 identities and >= 2 templates per identity for genuine and impostor pairs")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; use --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    name = target.lower()
    with atomic_output_dir(out_dir) as tmp:  # its mode comes from the umask (mkdtemp: 0700)
        (tmp / "meta").mkdir()
        (tmp / "loose_crop").mkdir()
        faces, marks, owner = [], [], {}
        image_no, media_id = 0, 1000
        for person in range(identities):
            identity = sample_identity(rng)
            for t in range(templates_per_id):
                template = person * templates_per_id + t + 1
                owner[template] = person
                for _ in range(rng.integers(1, 4)):
                    media_id += int(rng.integers(1, 50))
                    for _ in range(rng.integers(1, 4)):
                        image_no += 1
                        image, points = loose_crop(*render_face(identity, rng), rng)
                        file = f"{image_no}.jpg"
                        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                                [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                        if not ok:
                            raise RuntimeError(f"cannot encode {file}")
                        (tmp / "loose_crop" / file).write_bytes(jpeg.tobytes())
                        faces.append(f"{file} {template} {media_id}")
                        coords = " ".join(f"{v:.3f}" for v in points.ravel())
                        marks.append(f"{file} {coords} {rng.uniform(0.8, 1.0):.6f}")
        pairs = [f"{a} {b} {int(owner[a] == owner[b])}" for a, b in itertools.combinations(sorted(owner), 2)]
        for kind, lines in (("face_tid_mid", faces), ("name_5pts_score", marks), ("template_pair_label", pairs)):
            (tmp / "meta" / f"{name}_{kind}.txt").write_text("\n".join(lines) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a small IJB-format set of synthetic faces (for eval.ijb).")
    parser.add_argument("--out", required=True, help="directory to create (like IJB_release/IJBC)")
    parser.add_argument("--target", default="IJBC", help="prefix of the meta file names (IJBB or IJBC)")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--templates-per-id", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        out = generate(args.out, args.target, args.identities, args.templates_per_id, args.seed, args.force)
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
