"""Reading face images for the inference tools: which files, their 5-point landmarks, face crops.

Shared by tools/inference.py, tools/gallery.py and tools/recognize.py so they accept the same inputs and fail
the same way: a bad file is named in a one-line error (or skipped and reported when the caller asks for it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deploy.face_detect import Detection, single_face_crop
from utils.image import IMAGE_EXTENSIONS, decode_rgb, norm_crop

LIST_EXTENSIONS = (".txt", ".lst", ".list")


def list_images(path: str | Path) -> tuple[Path, list[str]]:
    """An image, a folder (searched recursively) or a list file (one path a line, relative to the list's folder).

    Returns (root, names): the folder the names are relative to, and the names in a stable order.
    """
    path = Path(path)
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not names:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return path, names
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image, folder or list file")
    if path.suffix.lower() in LIST_EXTENSIONS:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{path}: empty list file")
        return path.parent, names
    return path.parent, [path.name]


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; ValueError naming the file if it is missing or not an image."""
    try:
        data = Path(path).read_bytes()
        return decode_rgb(data)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


def load_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """5-point landmarks per image from JSON ({"name": [[x, y] x 5]}) or text (`name x1 y1 ... x5 y5` a line)."""
    path = Path(path)
    marks: dict[str, np.ndarray] = {}
    try:
        if path.suffix.lower() == ".json":
            items = json.loads(path.read_text()).items()
        else:
            items = [(parts[0], parts[1:]) for parts in (line.rsplit(maxsplit=10) for line in
                                                         path.read_text().splitlines() if line.strip())]
        for name, values in items:
            points = np.asarray(values, dtype=np.float64)
            if points.size != 10 or not np.isfinite(points).all():
                raise ValueError(f"entry {name!r} needs 5 finite (x, y) points, got {points.size} values")
            marks[name] = points.reshape(5, 2)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: bad landmarks file ({e})") from None
    return marks


def face_crop(root: Path, name: str, landmarks: dict[str, np.ndarray] | None = None,
              detection: Detection | None = None) -> tuple[np.ndarray, str]:
    """The 112x112 crop of one image and how it was made: aligned by its landmarks ("landmarks") when a landmarks
    file is given, else `deploy.face_detect.single_face_crop` (default `Detection()`: the Haar cascade)."""
    img = read_rgb(root / name)
    if landmarks is not None:
        points = landmarks.get(name, landmarks.get(Path(name).name))
        if points is None:
            raise ValueError(f"{root / name}: no landmarks for this image in the landmarks file")
        return norm_crop(img, points), "landmarks"
    return single_face_crop(img, root / name, detection or Detection())


def load_crops(root: Path, names: list[str], landmarks: dict[str, np.ndarray] | None = None,
               skip_bad: bool = False, detection: Detection | None = None,
               ) -> tuple[np.ndarray, list[str], list[dict[str, str]], list[str]]:
    """Crops of `names` (see `face_crop`) -> (N x 112 x 112 x 3 uint8, names kept, [{"file", "error"}] skipped,
    how each kept crop was made).

    A bad image raises ValueError unless `skip_bad`, in which case it is left out and reported.
    """
    crops, kept, skipped, how = [], [], [], []
    for name in names:
        try:
            crop, method = face_crop(root, name, landmarks, detection)
        except ValueError as e:
            if not skip_bad:
                raise
            skipped.append({"file": name, "error": str(e)})
            continue
        crops.append(crop)
        kept.append(name)
        how.append(method)
    if not crops:
        raise ValueError(f"{root}: none of the {len(names)} images could be used")
    return np.stack(crops), kept, skipped, how

