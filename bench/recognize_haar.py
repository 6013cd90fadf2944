"""How well the built-in Haar detector of tools/recognize.py finds and frames the synthetic demo faces.

    python bench/recognize_haar.py --seeds 0,1,2,3

For demo photos made by tools/make_face_demo.py (true boxes and landmarks known) it prints, as JSON lines:
faces found by the frontalface_alt2 and frontalface_default cascades (same detectMultiScale settings as the tool),
false detections, and for each crop margin the mean distance of the true 5 landmarks, carried into the 112x112
box crop, from the ArcFace template (what HAAR_MARGIN was chosen by); and how often haarcascade_eye finds both eyes
inside a face box and how far its eye centres are from the true ones (the eye alignment that was not adopted).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np

from deploy.face_files import read_rgb
from tools.make_face_demo import make_demo
from tools.recognize import HAAR_CASCADE
from utils.image import ARCFACE_TEMPLATE, INPUT_SIZE

MARGINS = (1.0, 1.1, 1.2, 1.3, 1.4)


def detect(cascade_name: str, gray: np.ndarray) -> list[np.ndarray]:
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / cascade_name))
    return [np.array([x, y, x + w, y + h], float) for x, y, w, h in
            cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3, minSize=(40, 40))]


def inside(a: np.ndarray, b: list[float]) -> float:
    """The fraction of box a that lies in box b."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]))


def template_distance(box: np.ndarray, landmarks: np.ndarray, margin: float) -> float:
    """Mean pixel distance (in the 112x112 crop) of the landmarks from the ArcFace template after a box crop."""
    side = margin * max(box[2] - box[0], box[3] - box[1])
    mapped = (landmarks - (box[:2] + box[2:]) / 2) * INPUT_SIZE / side + INPUT_SIZE / 2
    return float(np.linalg.norm(mapped - ARCFACE_TEMPLATE, axis=1).mean())


def eye_error(gray: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> float | None:
    """Worst eye-centre error / true eye distance of haarcascade_eye in the box's upper 60%; None if < 2 eyes."""
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_eye.xml"))
    x1, y1, x2, _ = box.astype(int)
    w = x2 - x1
    eyes = cascade.detectMultiScale(gray[y1:y1 + int(0.6 * w), x1:x2], 1.1, 3, minSize=(w // 8, w // 8),
                                    maxSize=(w // 2, w // 2))
    if len(eyes) < 2:
        return None
    centres = sorted((x1 + ex + ew / 2, y1 + ey + eh / 2) for ex, ey, ew, eh in eyes)
    found = np.array([centres[0], centres[-1]])  # the outermost two, image-left first like the landmarks
    return float(np.linalg.norm(found - landmarks[:2], axis=1).max() / np.linalg.norm(landmarks[1] - landmarks[0]))


def main(argv: list[str] | None = None) -> int:
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3", help="make_face_demo seeds, one photo each")
    parser.add_argument("--identities", type=int, default=4, help="known people per photo (plus one stranger)")
    args = parser.parse_args(argv)
    counts = {HAAR_CASCADE: 0, "haarcascade_frontalface_default.xml": 0}
    false_detections = {name: 0 for name in counts}
    distances: dict[float, list[float]] = {m: [] for m in MARGINS}
    eye_errors, total = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            demo = Path(tmp) / str(seed)
            make_demo(demo, identities=args.identities, seed=seed)  # the photo of `make_face_demo.py --seed`
            gray = cv2.cvtColor(read_rgb(demo / "photo.png"), cv2.COLOR_RGB2GRAY)
            truth = json.loads((demo / "faces.json").read_text())
            total += len(truth)
            for name in counts:
                for box in detect(name, gray):
                    face = max(truth, key=lambda t, b=box: inside(b, t["box"]))
                    if inside(box, face["box"]) < 0.5:
                        false_detections[name] += 1
                        continue
                    counts[name] += 1
                    if name == HAAR_CASCADE:
                        landmarks = np.array(face["landmarks"])
                        for m in MARGINS:
                            distances[m].append(template_distance(box, landmarks, m))
                        eye_errors.append(eye_error(gray, box, landmarks))
    for name in counts:
        print(json.dumps({"cascade": name, "faces": total, "found": counts[name],
                          "false_detections": false_detections[name]}))
    for m in MARGINS:
        print(json.dumps({"margin": m, "template_distance_px_mean": round(float(np.mean(distances[m])), 2),
                          "median": round(float(np.median(distances[m])), 2), "n": len(distances[m])}))
    pairs = [e for e in eye_errors if e is not None]
    print(json.dumps({"eye_cascade_two_eyes": len(pairs), "of": len(eye_errors),
                      "eye_error_over_eye_distance_median": round(float(np.median(pairs)), 3) if pairs else None,
                      "max": round(max(pairs), 3) if pairs else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
