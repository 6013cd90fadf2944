"""Finding faces in ordinary photos and cropping them to 112x112, for tools/gallery.py, inference.py and recognize.py.

What opencv-python-headless 4.14 offers without a download: Haar cascades (`cv2.data.haarcascades`: frontal faces,
eyes), which give boxes only. Landmarks need a model file: YuNet (`cv2.FaceDetectorYN`, in the main package, the
.onnx from the OpenCV model zoo) gives 5 points in ArcFace order; `cv2.face`'s Facemark (LBF/Kazemi, 68 points) is
only in opencv-contrib and needs a model file too. So: Haar by default, YuNet with --detector, landmark files from
any other detector with --landmarks / --faces.

A face with landmarks is aligned to the ArcFace template; a box alone is cropped square around its centre (a Haar
box enlarged 1.2x first) and resized, as the Paddle seed projects' demo does without alignment. An image that is
itself a face crop can be embedded whole (`--detect none`): the Haar cascade often misses a face that fills the
image, and the "no face found" error of an image shaped like a crop says so and offers that path.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.cli import finite_float
from utils.image import INPUT_SIZE, norm_crop

HAAR_CASCADE = "haarcascade_frontalface_alt2.xml"
# A Haar box is cropped as a square this many times its side. bench/recognize_haar.py (24 demo faces): the true
# landmarks land on average 12.0 px (of 112) from the ArcFace template with no margin, 10.1 px at 1.2, 9.9 at 1.3.
HAAR_MARGIN = 1.2
HAAR_MIN_FACE = 40  # px: detectMultiScale's minSize
# An image the detector found no face in is called a tight face crop when its shape is one: a face is about 0.75
# to 0.85 as wide as it is tall and a crop adds little margin (ArcFace crops are square, CelebA's aligned 0.82,
# a 227x248 portrait crop 0.92), and no side is so large that a whole scene fits beside the face.
CROP_ASPECT = (0.7, 1.3)
CROP_MAX_SIDE = 1024


@dataclass(frozen=True)
class Detection:
    """How the tools find the face in an image that is not an aligned 112x112 crop (see `add_detection_args`)."""

    mode: str = "auto"                 # "auto": detect (Haar, or YuNet with `detector`); "none": the whole image
    detector: str | Path | None = None  # a YuNet .onnx
    threshold: float = 0.7             # YuNet score threshold

    @property
    def kind(self) -> str:
        """How a crop was found: "whole" (the image), "yunet" or "haar"."""
        return "whole" if self.mode == "none" else "yunet" if self.detector else "haar"

    def find(self, image_rgb: np.ndarray) -> tuple[list[dict], float]:
        """(faces as {"box", "landmarks"}, the crop margin their boxes need) in an RGB image."""
        if self.mode == "none":
            height, width = image_rgb.shape[:2]
            return [{"box": np.array([0.0, 0.0, width, height]), "landmarks": None}], 1.0
        if self.detector:
            return faces_from_yunet(self.detector, image_rgb, self.threshold), 1.0
        return faces_from_haar(image_rgb), HAAR_MARGIN


def add_detection_args(parser: argparse.ArgumentParser, *, one_face: bool) -> None:
    """--detect, --detector, --det-threshold (the same in every tool); `one_face`: an image holds one person."""
    parser.add_argument("--detect", choices=["auto", "none"], default="auto",
                        help="auto: find the face with the Haar cascade (or --detector)"
                             + (", the largest if several; 112x112 images are taken as aligned crops" if one_face
                                else "") + "; none: the image is a face crop, embed it whole (squared and resized)")
    parser.add_argument("--detector", help="OpenCV YuNet face detector .onnx (boxes + 5 landmarks) instead of the "
                                           f"built-in {HAAR_CASCADE}")
    parser.add_argument("--det-threshold", type=finite_float(0, 1), default=0.7, help="YuNet score threshold")


def detection_from_args(args: argparse.Namespace, faces_option: str) -> Detection:
    """The options `add_detection_args` declared; `faces_option` (--landmarks, --faces) gives the faces from a file
    instead, so a detection option beside it would be silently ignored: refused."""
    if args.detect == "none" and args.detector:
        raise ValueError("--detect none embeds whole images: it takes no --detector")
    if getattr(args, faces_option.lstrip("-")) and (args.detector or args.detect == "none"):
        raise ValueError(f"{faces_option} gives the faces: it takes no --detector or --detect none")
    return Detection(args.detect, args.detector, args.det_threshold)


def faces_from_haar(image_rgb: np.ndarray) -> list[dict]:
    """Built-in detector: OpenCV's frontal-face Haar cascade; boxes only, so the faces get the rougher box crop.

    alt2 found 24 of 40 synthetic demo faces, the default cascade 21, neither any false detection
    (bench/recognize_haar.py, seeds 0-7); on the default demo photo 4 and 3 of 5.
    """
    path = Path(cv2.data.haarcascades) / HAAR_CASCADE
    if not (hasattr(cv2, "CascadeClassifier") and path.is_file()):  # OpenCV 5 dropped both
        raise ValueError(f"{path}: no Haar cascade in OpenCV {cv2.__version__} (install the pinned "
                         "opencv-python-headless 4.14, or give landmarks or --detector YUNET.onnx)")
    cascade = cv2.CascadeClassifier(str(path))
    boxes = cascade.detectMultiScale(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY), scaleFactor=1.1, minNeighbors=3,
                                     minSize=(HAAR_MIN_FACE, HAAR_MIN_FACE))
    return [{"box": np.array([x, y, x + w, y + h], dtype=np.float64), "landmarks": None} for x, y, w, h in boxes]


def faces_from_yunet(model: str | Path, image_rgb: np.ndarray, score_threshold: float) -> list[dict]:
    """Run OpenCV's YuNet detector; rows are x, y, w, h, 5 landmarks (image-left eye first), score."""
    height, width = image_rgb.shape[:2]
    try:
        detector = cv2.FaceDetectorYN.create(str(model), "", (width, height), score_threshold)
        _, found = detector.detect(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    except cv2.error as e:
        raise ValueError(f"{model}: cannot run it as an OpenCV YuNet face detector ({str(e).strip()[:200]})") from None
    rows = [] if found is None else found
    return [{"box": np.array([r[0], r[1], r[0] + r[2], r[1] + r[3]]), "landmarks": r[4:14].reshape(5, 2)}
            for r in rows]


def crop_face(image_rgb: np.ndarray, face: dict, margin: float = 1.0) -> np.ndarray:
    """112x112 crop: ArcFace alignment from landmarks, else a square `margin` x the box around its centre."""
    if face["landmarks"] is not None:
        return norm_crop(image_rgb, face["landmarks"])
    x1, y1, x2, y2 = face["box"]  # pixel edges: pixel i spans [i, i + 1), its centre is at i + 0.5
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, margin * max(x2 - x1, y2 - y1) / 2
    scale = INPUT_SIZE / (2 * half)
    # warpAffine maps pixel indices (centres): index + 0.5 -> scale * (index + 0.5 - centre) + INPUT_SIZE / 2
    tx, ty = (INPUT_SIZE / 2 - scale * c + 0.5 * (scale - 1) for c in (cx, cy))
    matrix = np.array([[scale, 0, tx], [0, scale, ty]])
    return cv2.warpAffine(image_rgb, matrix, (INPUT_SIZE, INPUT_SIZE), borderValue=0.0)


def looks_like_face_crop(image_shape: tuple[int, ...]) -> bool:
    """Whether an image's shape is that of a tight face crop (see CROP_ASPECT)."""
    height, width = image_shape[:2]
    return CROP_ASPECT[0] <= width / height <= CROP_ASPECT[1] and max(width, height) <= CROP_MAX_SIDE


def no_face_message(name: str | Path, image_shape: tuple[int, ...], detection: Detection) -> str:
    """`name: no face found ...`, saying why a tight crop is missed and how to embed it whole."""
    height, width = image_shape[:2]
    detector = "YuNet detector" if detection.detector else "Haar cascade"
    message = f"{name}: no face found by the {detector} ({width}x{height})"
    if min(width, height) < HAAR_MIN_FACE and not detection.detector:
        return f"{message}: smaller than the smallest face it finds ({HAAR_MIN_FACE} px); --detect none embeds it whole"
    if looks_like_face_crop(image_shape):
        return (f"{message}; it is shaped like a tight face crop, which the detector often misses: if it is one, "
                "--detect none embeds the whole image")
    return message


def single_face_crop(image_rgb: np.ndarray, name: str | Path, detection: Detection) -> tuple[np.ndarray, str]:
    """The 112x112 crop of the one person in an image and how it was made: "aligned" (the image already is an
    aligned 112x112 crop), "whole" (--detect none) or the detector's name; the largest face if several are found."""
    if image_rgb.shape[:2] == (INPUT_SIZE, INPUT_SIZE):
        return image_rgb, "aligned"
    faces, margin = detection.find(image_rgb)
    if not faces:
        raise ValueError(no_face_message(name, image_rgb.shape, detection))
    largest = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))
    return crop_face(image_rgb, largest, margin), detection.kind
