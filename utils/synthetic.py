"""The built-in synthetic face set: procedural faces, no download, a real InsightFace-layout dataset.

Every identity is a random draw of geometry and colour (face shape, skin tone, eyes, brows, nose, mouth,
hair, ears, facial hair, glasses, a mole); every image of it adds pose, expression, lighting, background,
blur, noise and sometimes an occluder. Identity lives in features that survive those variations, so a
network has to learn them: raw pixels verify poorly, a trained net verifies well.

    python -m utils.synthetic --out DIR --identities 1000 --images-per-id 20 --val-pairs 1000 --seed 2048

writes `train.rec`/`train.idx`/`property` (InsightFace layout, through mxnet_reader) and `synth_val.bin`
(pairs of held-out identities, JPEG-encoded like lfw.bin). The output is byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.atomic import errors_name
from utils.image import ARCFACE_TEMPLATE, INPUT_SIZE
from utils.locks import locked_temp_dir, remove_abandoned

# Bump when the renderer changes: it is part of the cache name, so stale caches are never reused.
GENERATOR_VERSION = 1
JPEG_QUALITY = 95
VAL_BIN_NAME = "synth_val.bin"

_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates carry 4 fractional bits
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

_HAIR_PALETTE = np.array([(25, 20, 20), (55, 38, 25), (105, 70, 40), (150, 70, 35), (205, 170, 110),
                          (165, 160, 155), (225, 220, 210)], dtype=np.float32)
_IRIS_PALETTE = np.array([(70, 45, 25), (40, 28, 18), (70, 110, 160), (80, 120, 70), (120, 125, 130),
                          (120, 95, 50)], dtype=np.float32)


@dataclass(frozen=True)
class Identity:
    """One synthetic person. Lengths are in pixels of the 112x112 ArcFace crop, colours are RGB 0-255."""

    skin: np.ndarray         # (3,) skin colour
    face_w: float            # half width of the cheeks
    face_h: float            # half height of the face oval
    face_cy: float           # centre of the face oval
    jaw: float               # jaw width relative to the cheeks (square vs pointed chin)
    eye_sep: float           # half the distance between the eye centres
    eye_y: float
    eye_w: float             # half width of an eye opening
    eye_h: float             # half height of an eye opening
    eye_tilt: float          # degrees, outer corner up when positive
    iris: np.ndarray         # (3,) iris colour
    iris_r: float
    brow_gap: float          # distance from eye centre to brow
    brow_thick: float
    brow_len: float
    brow_arch: float
    brow_tilt: float
    brow: np.ndarray         # (3,) brow colour
    nose_y: float
    nose_w: float
    nose_len: float
    mouth_y: float
    mouth_w: float           # half width, corner to centre
    lip_thick: float
    lips: np.ndarray         # (3,) lip colour
    mouth_curve: float       # resting smile (+) or frown (-)
    hair: np.ndarray         # (3,) hair colour
    hair_style: int          # 0 bald, 1 short, 2 fringe, 3 side part, 4 long
    hairline: float
    ear: float
    beard: int               # 0 none, 1 moustache, 2 full beard
    glasses: bool
    glasses_color: np.ndarray
    mole: np.ndarray | None  # (x, y) in the face frame, or None
    blush: float


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one person's geometry and colours."""
    t = rng.uniform(0.0, 1.0)  # dark -> light skin
    skin = np.array([75, 48, 32], np.float32) * (1 - t) + np.array([245, 210, 182], np.float32) * t
    skin = skin + rng.normal(0, [10, 7, 7]).astype(np.float32)
    hair = _HAIR_PALETTE[rng.integers(len(_HAIR_PALETTE))] + rng.normal(0, 12, 3).astype(np.float32)
    tx, ty = ARCFACE_TEMPLATE[:, 0], ARCFACE_TEMPLATE[:, 1]
    return Identity(
        skin=np.clip(skin, 0, 255),
        face_w=rng.uniform(36, 47), face_h=rng.uniform(50, 61), face_cy=rng.uniform(60, 68),
        jaw=rng.uniform(0.55, 0.95),
        eye_sep=(tx[1] - tx[0]) / 2 + rng.normal(0, 1.8), eye_y=ty[:2].mean() + rng.normal(0, 2.0),
        eye_w=rng.uniform(6.5, 10.5), eye_h=rng.uniform(2.5, 5.0), eye_tilt=rng.normal(0, 6),
        iris=np.clip(_IRIS_PALETTE[rng.integers(len(_IRIS_PALETTE))] + rng.normal(0, 10, 3), 0, 255).astype(np.float32),
        iris_r=rng.uniform(2.6, 3.8),
        brow_gap=rng.uniform(7, 12), brow_thick=rng.uniform(1.2, 4.0), brow_len=rng.uniform(10, 16),
        brow_arch=rng.uniform(-1, 4), brow_tilt=rng.normal(0, 7),
        brow=np.clip(hair * rng.uniform(0.5, 1.0), 0, 255),
        nose_y=ty[2] + rng.normal(0, 2.2), nose_w=rng.uniform(5, 10), nose_len=rng.uniform(12, 22),
        mouth_y=ty[3:].mean() + rng.normal(0, 2.2), mouth_w=(tx[4] - tx[3]) / 2 + rng.normal(0, 2.2),
        lip_thick=rng.uniform(1.5, 5.0),
        lips=np.clip(skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 12, 3), 0, 255).astype(np.float32),
        mouth_curve=rng.normal(0, 2.0),
        hair=np.clip(hair, 0, 255), hair_style=int(rng.integers(5)), hairline=rng.uniform(14, 30),
        ear=rng.uniform(7, 12),
        beard=int(rng.choice(3, p=[0.7, 0.15, 0.15])),
        glasses=bool(rng.uniform() < 0.15),
        glasses_color=rng.uniform(0, 200, 3).astype(np.float32),
        mole=rng.uniform([30, 45], [82, 100]).astype(np.float32) if rng.uniform() < 0.3 else None,
        blush=rng.uniform(0, 0.25),
    )


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(x * _ONE), round(y * _ONE)


def _ellipse(img: np.ndarray, c: tuple[float, float], axes: tuple[float, float], angle: float, color: np.ndarray,
             thickness: int = -1, start: float = 0, end: float = 360) -> None:
    cv2.ellipse(img, _pt(*c), _pt(max(axes[0], 0.1), max(axes[1], 0.1)), angle, start, end, _color(color),
                thickness, _AA, _SHIFT)


def _poly(img: np.ndarray, pts: np.ndarray, color: np.ndarray, closed: bool = True, thickness: int = -1) -> None:
    ipts = [np.round(np.asarray(pts, np.float64) * _ONE).astype(np.int32)]
    if thickness < 0:
        cv2.fillPoly(img, ipts, _color(color), _AA, _SHIFT)
    else:
        cv2.polylines(img, ipts, closed, _color(color), thickness, _AA, _SHIFT)


def _color(c: np.ndarray) -> tuple[float, ...]:
    return tuple(min(max(float(v), 0.0), 255.0) for v in c)


# Sensor noise fields, drawn once (fixed seed): picking one per image is 10x cheaper than fresh normals.
_NOISE_BANK = np.random.default_rng(0).standard_normal((32, INPUT_SIZE, INPUT_SIZE, 1), np.float32)
_ARC_U = np.linspace(-1, 1, 7)
_ARC_T = np.stack([(_ARC_U + 1) / 2, 1 - _ARC_U * _ARC_U], 1)


def _arc(x0: float, x1: float, y: float, bend: float) -> np.ndarray:
    """7 points of a parabola from (x0, y) to (x1, y) whose middle is `bend` pixels lower."""
    return _ARC_T * (x1 - x0, bend) + (x0, y)


def _draw_face(img: np.ndarray, p: Identity, rng: np.random.Generator) -> np.ndarray:
    """Draw one face in the canonical (template-aligned) frame; return its 5 landmarks in that frame."""
    yaw = rng.normal(0, 0.35)         # head turn: inner features slide sideways, the far ear hides
    smile = p.mouth_curve + rng.normal(1.0, 1.6)
    mouth_open = max(0.0, rng.normal(-0.5, 2.0))
    eye_open = float(np.clip(rng.normal(1.0, 0.15), 0.1, 1.25)) if rng.uniform() > 0.05 else 0.15
    brow_raise = rng.normal(0, 1.0)
    cx = 56.0 + yaw * 2.0
    fx = yaw * 5.0                    # shift of eyes and mouth
    skin_dark = p.skin * 0.78
    # hair behind the head, neck, shoulders (clothes change from photo to photo)
    if p.hair_style == 4:
        _poly(img, [[cx - p.face_w - 9, 30], [cx + p.face_w + 9, 30], [cx + p.face_w + 12, 118],
                    [cx - p.face_w - 12, 118]], p.hair)
    _poly(img, [[cx - 16, 95], [cx + 16, 95], [cx + 18, 118], [cx - 18, 118]], skin_dark)
    _ellipse(img, (cx, 128), (50, 18), 0, rng.uniform(0, 255, 3))
    # ears (the one on the turned-away side shrinks)
    for side in (-1, 1):
        vis = float(np.clip(1 + side * yaw * 1.5, 0.2, 1.6))
        _ellipse(img, (cx + side * (p.face_w + 1), p.eye_y + 10), (p.ear * 0.45 * vis, p.ear), 0, skin_dark)
    # head: a cheek oval joined to a jaw oval
    if p.hair_style != 0:
        _ellipse(img, (cx, p.face_cy - 6), (p.face_w + 4, p.face_h + 2), 0, p.hair)
    _ellipse(img, (cx, p.face_cy), (p.face_w, p.face_h * 0.8), 0, p.skin)
    _ellipse(img, (cx, p.face_cy + p.face_h * 0.18), (p.face_w * p.jaw, p.face_h * 0.82), 0, p.skin)
    # hair over the forehead
    if p.hair_style in (1, 3, 4):
        tilt = 8.0 if p.hair_style == 3 else 0.0
        pts = cv2.ellipse2Poly((0, 0), (100, 100), 0, 180, 360, 10).astype(np.float64) / 100
        pts = np.stack([cx + pts[:, 0] * (p.face_w + 4), p.face_cy - 6 + pts[:, 1] * (p.face_h + 2)], 1)
        line = p.hairline + tilt * (pts[:, 0] - cx) / p.face_w
        pts[:, 1] = np.minimum(pts[:, 1], line)
        _poly(img, pts, p.hair)
    elif p.hair_style == 2:  # fringe with a jagged edge
        xs = np.linspace(cx - p.face_w, cx + p.face_w, 9)
        ys = p.hairline + 8 + np.where(np.arange(9) % 2 == 0, 0.0, 4.0)
        _poly(img, np.concatenate([[[cx - p.face_w - 4, 0], [cx + p.face_w + 4, 0]], np.stack([xs, ys], 1)[::-1]]),
              p.hair)
    if p.blush > 0:
        for side in (-1, 1):
            _ellipse(img, (cx + fx + side * p.eye_sep * 1.2, p.nose_y + 3), (7, 5), 0,
                     p.skin * (1 - p.blush) + np.array([220, 90, 90]) * p.blush)
    # facial hair
    if p.beard == 2:
        jw, chin_y = p.face_w * p.jaw, p.face_cy + p.face_h * 0.7
        jaw = np.array([[cx - jw, p.nose_y + 6], [cx - jw * 0.9, chin_y], [cx, p.face_cy + p.face_h],
                        [cx + jw * 0.9, chin_y], [cx + jw, p.nose_y + 6], [cx + fx + p.mouth_w, p.mouth_y + 6],
                        [cx + fx - p.mouth_w, p.mouth_y + 6]])
        _poly(img, jaw, p.hair * 0.8)
    if p.beard >= 1:
        _poly(img, [[cx + fx - p.mouth_w - 2, p.mouth_y + 1], [cx + fx, p.mouth_y - 8], [cx + fx + p.mouth_w + 2,
                    p.mouth_y + 1], [cx + fx, p.mouth_y - 3]], p.hair * 0.8)
    # eyes, iris, lids, brows
    eyes = []
    for side in (-1, 1):
        ex, ey = cx + fx + side * p.eye_sep, p.eye_y
        gaze = rng.normal(0, 0.8)
        _ellipse(img, (ex, ey), (p.eye_w, p.eye_h * eye_open), side * p.eye_tilt, np.array([235, 232, 225]))
        if eye_open > 0.3:
            _ellipse(img, (ex + gaze, ey), (p.iris_r, min(p.iris_r, p.eye_h * eye_open)), 0, p.iris)
            _ellipse(img, (ex + gaze, ey), (p.iris_r * 0.4, min(p.iris_r * 0.4, p.eye_h * eye_open)), 0,
                     np.array([15, 12, 12]))
        _ellipse(img, (ex, ey), (p.eye_w, p.eye_h * eye_open), side * p.eye_tilt, np.array([45, 30, 25]), 1, 180, 360)
        bx, by = ex + side * 1.0, ey - p.brow_gap - brow_raise
        brow = _arc(bx - side * p.brow_len / 2, bx + side * p.brow_len / 2, by, -p.brow_arch)
        brow[:, 1] -= side * (brow[:, 0] - bx) * np.tan(np.radians(p.brow_tilt))
        cv2.polylines(img, [np.round(brow * _ONE).astype(np.int32)], False, _color(p.brow),
                      max(1, round(p.brow_thick)), _AA, _SHIFT)
        eyes.append((ex, ey))
    # nose: bridge shading, tip, nostrils
    nx, ny = cx + yaw * 8.0, p.nose_y
    _poly(img, [[nx - 2, ny - p.nose_len], [nx - p.nose_w * 0.6, ny], [nx + p.nose_w * 0.6, ny]], p.skin * 0.9)
    _ellipse(img, (nx, ny - 1), (p.nose_w * 0.45, 3.0), 0, p.skin * 1.05)
    for side in (-1, 1):
        _ellipse(img, (nx + side * p.nose_w * 0.4, ny + 1.5), (1.8, 1.1), 0, p.skin * 0.45)
    # mouth: expression bends the lip line and opens the mouth
    mx, my = cx + fx, p.mouth_y
    corners = [(mx - p.mouth_w, my - smile), (mx + p.mouth_w, my - smile)]
    upper = _arc(mx - p.mouth_w, mx + p.mouth_w, my - smile, smile - p.lip_thick * 0.5)
    lower = _arc(mx - p.mouth_w, mx + p.mouth_w, my - smile, smile + p.lip_thick + mouth_open)
    _poly(img, np.concatenate([upper, lower[::-1]]), p.lips)
    if mouth_open > 0.5:
        inner_top = _arc(mx - p.mouth_w * 0.8, mx + p.mouth_w * 0.8, my - smile * 0.8, smile * 0.8)
        inner_bot = _arc(mx - p.mouth_w * 0.8, mx + p.mouth_w * 0.8, my - smile * 0.8, smile * 0.8 + mouth_open)
        _poly(img, np.concatenate([inner_top, inner_bot[::-1]]), np.array([60, 20, 25]))
    _poly(img, _arc(mx - p.mouth_w, mx + p.mouth_w, my - smile, smile), p.lips * 0.6, False, 1)
    if p.mole is not None:
        _ellipse(img, (p.mole[0] + fx, p.mole[1]), (1.3, 1.3), 0, p.skin * 0.35)
    if p.glasses and rng.uniform() < 0.8:
        for ex, ey in eyes:
            _ellipse(img, (ex, ey), (p.eye_w + 4, p.eye_h + 5), 0, p.glasses_color, 1)
        _poly(img, [[eyes[0][0] + p.eye_w + 4, eyes[0][1]], [eyes[1][0] - p.eye_w - 4, eyes[1][1]]],
              p.glasses_color, False, 1)
    return np.array([eyes[0], eyes[1], (nx, ny), corners[0], corners[1]], np.float32)


def _occlude(img: np.ndarray, rng: np.random.Generator) -> None:
    """A hand, a scarf, sunglasses or a random patch over part of the face."""
    kind = rng.integers(3)
    color = rng.uniform(0, 255, 3)
    if kind == 0:    # a bar across the lower or upper face
        y = rng.uniform(40, 100)
        _poly(img, [[0, y], [112, y + rng.normal(0, 8)], [112, y + 22], [0, y + 18]], color)
    elif kind == 1:  # sunglasses
        for x in (38, 74):
            _ellipse(img, (x + rng.normal(0, 2), 52 + rng.normal(0, 2)), (13, 9), 0, color * 0.3)
    else:            # a blob from the side
        _ellipse(img, (rng.choice([5, 107]), rng.uniform(30, 100)), (rng.uniform(15, 30), rng.uniform(15, 30)),
                 rng.uniform(0, 180), color)


def _render_batch(identity: Identity, rng: np.random.Generator, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images of one identity -> (count x size x size x 3 uint8 RGB, count x 5 x 2 float32 landmarks)."""
    canvas = np.empty((count, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    marks = np.empty((count, 5, 2), np.float32)
    for i in range(count):
        bg = cv2.resize(rng.uniform(0, 255, (3, 3, 3)).astype(np.float32), (INPUT_SIZE, INPUT_SIZE),
                        interpolation=cv2.INTER_LINEAR)
        img = np.ascontiguousarray(bg.astype(np.uint8))
        pts = _draw_face(img, identity, rng)
        if rng.uniform() < 0.15:
            _occlude(img, rng)
        # pose jitter: rotate, scale and shift the aligned face, as a detector + alignment would leave it
        angle, scale = rng.normal(0, 6), rng.uniform(0.92, 1.08)
        m = cv2.getRotationMatrix2D((56.0, 60.0), angle, scale)
        m[:, 2] += rng.normal(0, 2.5, 2)
        canvas[i] = cv2.warpAffine(img, m, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
        marks[i] = pts @ m[:, :2].T.astype(np.float32) + m[:, 2].astype(np.float32)
    # lighting, vectorised over the batch: exposure, colour cast, a directional gradient, gamma
    grid = np.linspace(-1, 1, INPUT_SIZE, dtype=np.float32)
    gx = rng.normal(0, 0.25, (count, 1, 1, 1)).astype(np.float32)
    gy = rng.normal(0, 0.15, (count, 1, 1, 1)).astype(np.float32)
    gain = (rng.uniform(0.6, 1.3, (count, 1, 1, 1)) * rng.normal(1, 0.08, (count, 1, 1, 3)) * 255).astype(np.float32)
    levels = np.arange(256, dtype=np.float32) / 255
    gamma = rng.uniform(0.8, 1.25, count).astype(np.float32)
    out = np.stack([cv2.LUT(im, levels**g) for g, im in zip(gamma, canvas, strict=True)])  # gamma through a table
    out *= 1 + gx * grid[None, None, :, None] + gy * grid[None, :, None, None]
    out *= gain
    sigma = rng.choice([0.0, 0.6, 1.0, 1.6], count, p=[0.3, 0.3, 0.25, 0.15])
    lowres = rng.uniform(size=count) < 0.2
    for i in range(count):
        if sigma[i] > 0:
            out[i] = cv2.GaussianBlur(out[i], (0, 0), sigma[i])
        if lowres[i]:
            small = cv2.resize(out[i], (40, 40), interpolation=cv2.INTER_AREA)
            out[i] = cv2.resize(small, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    noise_level = rng.uniform(0, 8, (count, 1, 1, 1)).astype(np.float32)
    out += _NOISE_BANK[rng.integers(len(_NOISE_BANK), size=count)] * noise_level
    images = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if size != INPUT_SIZE:
        images = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
        marks *= size / INPUT_SIZE
    return images, marks


def render_face(identity: Identity, rng: np.random.Generator, size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One image of `identity` -> (size x size x 3 uint8 RGB, 5x2 float32 landmarks in ArcFace template order)."""
    images, marks = _render_batch(identity, rng, 1, size)
    return images[0], marks[0]


def _encode_jpeg(img_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def _identity_jpegs(task: tuple[int, int, int, int]) -> list[bytes]:
    """JPEGs of one identity. Each identity has its own random stream, so any worker split gives the same bytes."""
    seed, stream, index, count = task
    rng = np.random.default_rng([seed, stream, index])
    identity = sample_identity(rng)
    images, _ = _render_batch(identity, rng, count, INPUT_SIZE)
    return [_encode_jpeg(img) for img in images]


_TRAIN, _VAL, _PAIRS = 0, 1, 2  # independent random streams: train identities, held-out identities, pair choice


def _map_identities(tasks: list[tuple[int, int, int, int]], workers: int) -> Iterator[list[bytes]]:
    """Render identities in order, in `workers` spawned processes when > 1.

    Spawn (not fork) is safe after `import paddle` and on every OS, but it re-imports the caller's main module:
    only use workers > 1 from a script with an `if __name__ == "__main__":` guard (the CLI has one).
    """
    if workers <= 1:
        yield from map(_identity_jpegs, tasks)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_identity_jpegs, tasks, chunksize=8)


def val_pairs_plan(val_pairs: int, val_identities: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which held-out identity each of the 2N val images shows, and issame. Even pairs are same, odd different,
    so every one of the 10 contiguous evaluation folds is balanced."""
    rng = np.random.default_rng([seed, _PAIRS])
    issame = np.arange(val_pairs) % 2 == 0
    ids = np.empty((val_pairs, 2), np.int64)
    for i, same in enumerate(issame):
        ids[i] = rng.integers(val_identities) if same else rng.choice(val_identities, 2, replace=False)
    return ids.reshape(-1), issame


def default_val_identities(val_pairs: int) -> int:
    return max(10, val_pairs // 2)


def generate(out_dir: str | Path, identities: int, images_per_id: int, val_pairs: int, seed: int,
             val_identities: int | None = None, workers: int = 1, progress: bool = True) -> Path:
    """Write train.rec/train.idx/property and synth_val.bin into `out_dir`; byte-identical for the same arguments."""
    from eval.bin_io import write_bin
    from mxnet_reader.insightface import write_insightface_rec

    if identities < 1 or images_per_id < 1 or val_pairs < 2:
        raise ValueError(f"need identities >= 1, images_per_id >= 1, val_pairs >= 2; got {identities}, "
                         f"{images_per_id}, {val_pairs}")
    val_identities = val_identities or default_val_identities(val_pairs)
    if val_identities < 2:
        raise ValueError(f"need at least 2 held-out identities for different pairs, got {val_identities}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    train_tasks = [(seed, _TRAIN, i, images_per_id) for i in range(identities)]
    samples = ((label, jpeg) for label, jpegs in enumerate(_map_identities(train_tasks, workers)) for jpeg in jpegs)
    write_insightface_rec(out_dir, samples, total=identities * images_per_id, progress=progress,
                          desc="synthetic train")

    who, issame = val_pairs_plan(val_pairs, val_identities, seed)
    counts = np.bincount(who, minlength=val_identities)
    used = np.flatnonzero(counts)
    val_tasks = [(seed, _VAL, int(j), int(counts[j])) for j in used]
    rendered = dict(zip(used.tolist(), map(iter, _map_identities(val_tasks, workers)), strict=True))
    write_bin(out_dir / VAL_BIN_NAME, [next(rendered[j]) for j in who.tolist()], issame)
    return out_dir


def cache_name(identities: int, images_per_id: int, val_pairs: int, seed: int) -> str:
    """The cache directory name: every parameter and the renderer version, so a change never reuses stale data."""
    return f"synthetic-v{GENERATOR_VERSION}-i{identities}-k{images_per_id}-p{val_pairs}-s{seed}"


def ensure_synthetic(cache_dir: str | Path, identities: int, images_per_id: int, val_pairs: int, seed: int,
                     workers: int = 1) -> Path:
    """The synthetic set's directory under `cache_dir`, generated on first use.

    Generation goes to a private temp dir (locked by its generator) that is renamed into place, so a reader never
    sees a half-written set. If several processes (ranks) call this at once, each may generate; the first rename
    wins and the others discard their identical copy. Temp dirs of generators that were killed (any cache name) are
    removed by the next call (utils/locks.py: only those whose lock is free); a live generator's is never touched.
    """
    final = Path(cache_dir) / cache_name(identities, images_per_id, val_pairs, seed)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(final.parent, "synthetic-*")  # of any size and seed
    with locked_temp_dir(final) as tmp:
        try:
            with errors_name(final):  # a full disk's error names no file
                generate(tmp, identities, images_per_id, val_pairs, seed, workers=workers)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--identities", type=int, default=1000, help="training identities")
    parser.add_argument("--images-per-id", type=int, default=20)
    parser.add_argument("--val-pairs", type=int, default=1000, help="pairs in synth_val.bin (half same, half not)")
    parser.add_argument("--val-identities", type=int, default=None,
                        help="held-out identities for synth_val.bin (default: val_pairs / 2)")
    parser.add_argument("--seed", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4), help="rendering processes")
    parser.add_argument("--force", action="store_true", help="overwrite an existing dataset in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    existing = [p.name for p in (out / "train.rec", out / "train.idx", out / VAL_BIN_NAME) if p.exists()]
    if existing and not args.force:
        parser.error(f"{out} already holds {', '.join(existing)}; pass --force to overwrite")
    generate(out, args.identities, args.images_per_id, args.val_pairs, args.seed, args.val_identities, args.workers)
    print(f"wrote {out}: {args.identities} identities x {args.images_per_id} images, {args.val_pairs} val pairs")


if __name__ == "__main__":
    main()
