"""Procedural faces for the built-in synthetic data set (synthetic.py), the IJB-like set and the demos: no download.

Every identity is a random draw of geometry and colour (face shape, skin tone, eyes, brows, nose, mouth,
hair, ears, facial hair, glasses, a mole); every image of it adds pose, expression, lighting, background,
blur, noise and sometimes an occluder. Identity lives in features that survive those variations, so a
network has to learn them: raw pixels verify poorly, a trained net verifies well.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from utils.image import ARCFACE_TEMPLATE, INPUT_SIZE

# Bump when the renderer changes: it is part of the synthetic set's cache name, so stale caches are never reused.
RENDERER_VERSION = 1

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


def _draw_head(img: np.ndarray, p: Identity, rng: np.random.Generator, cx: float, fx: float, yaw: float) -> None:
    """Hair, neck, shoulders, ears, the head's outline and facial hair (the face's features come after)."""
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


def _draw_eyes(img: np.ndarray, p: Identity, rng: np.random.Generator, x: float, eye_open: float,
               brow_raise: float) -> list[tuple[float, float]]:
    """Both eyes (white, iris, pupil, lid) and brows around the middle `x`; their centres, left first."""
    eyes = []
    for side in (-1, 1):
        ex, ey = x + side * p.eye_sep, p.eye_y
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
    return eyes


def _draw_face(img: np.ndarray, p: Identity, rng: np.random.Generator) -> np.ndarray:
    """Draw one face in the canonical (template-aligned) frame; return its 5 landmarks in that frame."""
    yaw = rng.normal(0, 0.35)         # head turn: inner features slide sideways, the far ear hides
    smile = p.mouth_curve + rng.normal(1.0, 1.6)
    mouth_open = max(0.0, rng.normal(-0.5, 2.0))
    eye_open = float(np.clip(rng.normal(1.0, 0.15), 0.1, 1.25)) if rng.uniform() > 0.05 else 0.15
    brow_raise = rng.normal(0, 1.0)
    cx = 56.0 + yaw * 2.0
    fx = yaw * 5.0                    # shift of eyes and mouth
    _draw_head(img, p, rng, cx, fx, yaw)
    eyes = _draw_eyes(img, p, rng, cx + fx, eye_open, brow_raise)
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


def render_faces(identity: Identity, rng: np.random.Generator, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
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
    images, marks = render_faces(identity, rng, 1, size)
    return images[0], marks[0]
