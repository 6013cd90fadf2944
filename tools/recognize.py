"""Find who is in a photo: locate faces, align, embed, search a gallery, draw boxes and names.

    python tools/recognize.py --image photo.jpg --faces faces.json --index index.npz --out annotated.jpg \
        --model exported/r50
    python tools/recognize.py --image photo.jpg --detector face_detection_yunet_2023mar.onnx --index index.npz \
        --out annotated.jpg --model exported/r50

Faces come from one of:
  (default)        OpenCV's Haar cascade haarcascade_frontalface_alt2.xml that ships inside opencv-python
                   (cv2.data.haarcascades): frontal faces only, boxes without landmarks, nothing to download.
  --faces FILE     a JSON list of {"box": [x1, y1, x2, y2], "landmarks": [[x, y] x 5]} (landmarks optional), as any
                   external detector (SCRFD, RetinaFace, ...) can write; tools/make_face_demo.py writes one.
  --detector ONNX  OpenCV's YuNet face detector (cv2.FaceDetectorYN, model file from the OpenCV model zoo), which
                   returns boxes and the 5 landmarks in ArcFace order.
  --detect none    the photo is a face crop: embed it whole (the cascade often misses a face that fills the image).
Faces with landmarks are aligned to the ArcFace template; a box alone is cropped square around its centre and
resized to 112x112 (rougher; a Haar box is first enlarged 1.2x, its measured offset from the ArcFace crop).
"No face found" exits with status 2 unless --allow-empty.
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

from deploy.embedder import add_model_args, embedder_from_args
from deploy.face_detect import HAAR_CASCADE, add_detection_args, crop_face, detection_from_args, no_face_message
from deploy.face_files import read_rgb
from deploy.gallery import UNKNOWN, GalleryIndex
from utils.atomic import write_output
from utils.cli import check_writable, exit_on_user_error, finite_float, positive_int, start_program

NO_FACE_EXIT = 2


def faces_from_file(path: str | Path, image_shape: tuple[int, ...]) -> list[dict]:
    """Read and check a --faces JSON list: boxes inside the image, optional 5 landmarks."""
    try:
        items = json.loads(Path(path).read_text())
        if not isinstance(items, list):
            raise ValueError("expected a JSON list of faces")
        faces = []
        for n, item in enumerate(items):
            box = np.asarray(item["box"], dtype=np.float64)
            if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"face {n}: box must be [x1, y1, x2, y2] with x2 > x1, y2 > y1, got {item['box']}")
            if box[2] <= 0 or box[3] <= 0 or box[0] >= image_shape[1] or box[1] >= image_shape[0]:
                raise ValueError(f"face {n}: box {item['box']} is outside the image "
                                 f"({image_shape[1]}x{image_shape[0]})")
            marks = item.get("landmarks")
            if marks is not None:
                marks = np.asarray(marks, dtype=np.float64)
                if marks.shape != (5, 2) or not np.isfinite(marks).all():
                    raise ValueError(f"face {n}: landmarks must be 5 [x, y] points")
            faces.append({"box": box, "landmarks": marks})
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: bad faces file ({type(e).__name__}: {e})") from None
    return faces


def draw(image_rgb: np.ndarray, faces: list[dict], results: list[dict]) -> np.ndarray:
    """Boxes (green: known, red: unknown) with `name score` labels, as a BGR image ready to encode."""
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    for face, result in zip(faces, results, strict=True):
        x1, y1, x2, y2 = (round(float(v)) for v in face["box"])
        color = (40, 40, 230) if result["identity"] == UNKNOWN else (60, 200, 60)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness + 1)
        label = f"{result['identity']} {result['score']:.2f}"
        (unit_w, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 1.0, thickness)
        font_scale = min(0.5 * thickness, (x2 - x1) / unit_w)  # the label fits above its own box
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = max(0, y1 - th - base - 4)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 4, top + th + base + 4), color, -1)
        cv2.putText(canvas, label, (x1 + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return canvas


def recognize(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out}: exists (use --force to replace it)")
    if not cv2.haveImageWriter(str(args.out)):
        raise ValueError(f"{args.out}: OpenCV cannot write this image format (use .png or .jpg)")
    check_writable(args.out)
    detection = detection_from_args(args, "--faces")
    image = read_rgb(args.image)
    index = GalleryIndex.load(args.index)
    if args.faces:
        faces, margin = faces_from_file(args.faces, image.shape), 1.0
    else:
        faces, margin = detection.find(image)
    if not faces and not args.allow_empty:
        message = f"{args.image}: no face found ({args.faces} lists none)" if args.faces else no_face_message(
            args.image, image.shape, detection)
        print(f"error: {message}", file=sys.stderr)
        return NO_FACE_EXIT
    results = []
    if faces:
        embedder = embedder_from_args(args)
        index.check_model(embedder.embedding_size, embedder.meta, str(args.index))
        crops = np.stack([crop_face(image, f, margin) for f in faces])
        results = index.search(embedder.embed(crops, batch_size=args.batch_size, flip=args.flip), args.top_k,
                               args.threshold)
    _, encoded = cv2.imencode(args.out.suffix, draw(image, faces, results))
    write_output(args.out, encoded.tobytes(), force=args.force)
    for face, result in zip(faces, results, strict=True):
        print(json.dumps({"box": [round(float(v), 1) for v in face["box"]], **result}))
    print(f"{len(faces)} face(s) -> {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    start_program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--image", required=True, help="the photo")
    parser.add_argument("--index", required=True, type=Path, help="gallery index from tools/gallery.py build")
    parser.add_argument("--out", required=True, type=Path, help="annotated image to write (.png, .jpg)")
    parser.add_argument("--faces", help=f"JSON list of face boxes (+ optional 5 landmarks) instead of {HAAR_CASCADE}")
    add_detection_args(parser, one_face=False)
    parser.add_argument("--top-k", type=positive_int, default=3, help="identities listed per face")
    parser.add_argument("--threshold", type=finite_float(-1, 1), default=0.3,
                        help="cosine score (-1 to 1) below which a face is 'unknown'")
    parser.add_argument("--allow-empty", action="store_true", help="write the image and exit 0 when no face is found")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    add_model_args(parser)
    args = parser.parse_args(argv)
    return exit_on_user_error(lambda: recognize(args))


if __name__ == "__main__":
    sys.exit(main())
