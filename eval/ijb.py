"""IJB-B / IJB-C 1:1 verification (TAR@FAR) with InsightFace's protocol.

    python -m eval.ijb --data IJB_release/IJBC --target IJBC --network r50 --weights model.pdparams --out DIR

Layout of `--data` (InsightFace's IJB release; file names use the lower-case target, upper case is accepted too):
    meta/<target>_face_tid_mid.txt        one line per face: "<image name> <template id> <media id>"
    meta/<target>_name_5pts_score.txt     same faces, same order: "<image name> x1 y1 ... x5 y5 <detector score>"
    meta/<target>_template_pair_label.txt one line per pair: "<template id> <template id> <1 genuine | 0 impostor>"
    loose_crop/<image name>               the detector's loose crops (landmarks are in their pixels)

Protocol (InsightFace `ijb_11.py` / arcface_torch `eval_ijbc.py`, default test mode): each face is aligned to the
ArcFace template from its 5 landmarks; its feature is the embedding of the crop plus that of its mirror, not
normalised, times the detector score (`--no-detector-score` turns that off); inside a template the features of one
media (all frames of a video) are averaged, the media features are summed and the sum is L2-normalised; the score of
a template pair is the cosine. TAR at FAR 1e-6 ... 1e-1 is read from sklearn's `roc_curve` at the ROC point whose
FAR is closest to the target (the largest TAR among equal FARs), as InsightFace does; where the ROC is coarser than
the target (small sets, FAR 1e-6 on IJB-B) that point's FAR can be above the target: the CSV lists it (`far`) and
also the conservative reading, the largest TAR at a FAR <= the target (`tar_far_le_target`).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize
from tqdm import tqdm

from utils.atomic import write_bytes_atomic
from utils.cli import check_writable, exit_on_user_error, positive_float, positive_int, start_program
from utils.image import decode_rgb, norm_crop

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SCORE_CHUNK = 100_000  # template pairs scored at once (bounds memory on IJB-C's 15.7M pairs)


@dataclass
class IJBMeta:
    """The parsed meta files: one row per face (image, landmarks, score, template, media), one per pair."""

    image_names: list[str]
    landmarks: np.ndarray  # [N, 5, 2] float32, pixels of the loose crop
    faceness: np.ndarray   # [N] float32 detector score
    templates: np.ndarray  # [N] int64
    medias: np.ndarray     # [N] int64
    pairs: np.ndarray      # [P, 2] int64 template ids
    labels: np.ndarray     # [P] int64, 1 genuine / 0 impostor


def meta_path(data_dir: Path, target: str, kind: str) -> Path:
    """meta/<target>_<kind>.txt, trying the lower-case name InsightFace uses, then the target as given/upper."""
    candidates = [data_dir / "meta" / f"{name}_{kind}.txt" for name in dict.fromkeys(
        (target.lower(), target, target.upper()))]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"IJB meta file missing: {candidates[0]} (is --data the IJB_release/{target.upper()} "
                            f"directory and --target {target.upper()}?)")


def _read_rows(path: Path, columns: int) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise ValueError(f"{path}:{number}: expected {columns} fields, got {len(fields)}: {line.strip()!r}")
            rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: empty")
    return rows


def _numbers(path: Path, rows: list[list[str]], columns: slice, dtype: type) -> np.ndarray:
    try:
        return np.array([row[columns] for row in rows], dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric field ({e})") from None


def read_meta(data_dir: str | Path, target: str) -> IJBMeta:
    """Parse and cross-check the three meta files (same faces in the same order, pairs name known templates)."""
    data_dir = Path(data_dir)
    tid_path = meta_path(data_dir, target, "face_tid_mid")
    lmk_path = meta_path(data_dir, target, "name_5pts_score")
    pair_path = meta_path(data_dir, target, "template_pair_label")
    faces = _read_rows(tid_path, 3)
    marks = _read_rows(lmk_path, 12)
    if len(faces) != len(marks):
        raise ValueError(f"{tid_path} lists {len(faces)} faces but {lmk_path} {len(marks)}")
    for number, (face, mark) in enumerate(zip(faces, marks, strict=True), 1):
        if face[0] != mark[0]:
            raise ValueError(f"face {number}: {tid_path.name} names {face[0]} but {lmk_path.name} names {mark[0]}")
    ids = _numbers(tid_path, faces, slice(1, 3), np.int64)
    values = _numbers(lmk_path, marks, slice(1, 12), np.float32)
    try:
        pairs = np.loadtxt(pair_path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{pair_path}: not 'template template label' integer rows ({e})") from None
    if pairs.shape[1] != 3 or not len(pairs):
        raise ValueError(f"{pair_path}: expected 3 integer columns, got shape {list(pairs.shape)}")
    unknown = ~np.isin(pairs[:, :2], ids[:, 0]).all(axis=1)
    if unknown.any():
        first = pairs[np.argmax(unknown)]
        raise ValueError(f"{pair_path}: {int(unknown.sum())} pairs name templates without faces "
                         f"(first: {first[0]} {first[1]})")
    labels = pairs[:, 2]
    if not np.isin(labels, (0, 1)).all() or len(np.unique(labels)) < 2:
        raise ValueError(f"{pair_path}: labels must be 0/1 with both present, got values {np.unique(labels)[:5]}")
    return IJBMeta([m[0] for m in marks], values[:, :10].reshape(-1, 5, 2), values[:, 10], ids[:, 0], ids[:, 1],
                   pairs[:, :2], labels)


def check_images(image_dir: Path, names: list[str]) -> None:
    """Fail before any computation if loose crops are missing (an IJB-C run takes hours)."""
    missing = [name for name in names if not (image_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} images listed in the meta files are missing from "
                                f"{image_dir}, e.g. {', '.join(missing[:3])}")


def load_aligned(path: Path, landmarks: np.ndarray) -> np.ndarray:
    """Read a loose crop and align it to the 112x112 ArcFace template -> HxWx3 uint8 RGB."""
    try:
        img = decode_rgb(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path}: cannot decode image") from None
    return norm_crop(img, landmarks)


def image_features(model, image_dir: Path, meta: IJBMeta, batch_size: int = 128, flip: bool = True,
                   workers: int = 4, progress: bool = True) -> np.ndarray:
    """Per-face feature [N, D] float32: embedding of the aligned crop (+ its mirror), not normalised.

    Images of the next batch are read and aligned by a thread pool while the model runs (OpenCV releases the GIL).
    """
    import paddle

    from eval.verification import embed_views

    starts = range(0, len(meta.image_names), batch_size)

    def submit(start: int) -> list:
        stop = min(start + batch_size, len(meta.image_names))
        return [pool.submit(load_aligned, image_dir / meta.image_names[i], meta.landmarks[i])
                for i in range(start, stop)]

    feats = None
    was_training = model.training
    model.eval()
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool, paddle.no_grad():
            pending = submit(0)
            for start in tqdm(starts, desc="IJB features", unit="batch", disable=not progress):
                batch = np.stack([future.result() for future in pending])
                if start + batch_size < len(meta.image_names):
                    pending = submit(start + batch_size)
                views = embed_views(model, batch, flip)
                if feats is None:
                    feats = np.empty((len(meta.image_names), views[0].shape[1]), dtype=np.float32)
                feats[start:start + len(batch)] = sum(views[1:], views[0])
    finally:
        if was_training:
            model.train()
    return feats


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (sorted unique template ids, [T, D] L2-normalised template features).

    A template's feature is the sum over its media of the mean feature of that media's faces.
    """
    feats = np.asarray(feats, dtype=np.float64)
    media_keys, media_index = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    media_sum = np.zeros((len(media_keys), feats.shape[1]))
    np.add.at(media_sum, media_index.ravel(), feats)
    media_mean = media_sum / np.bincount(media_index.ravel())[:, None]
    unique_templates, template_index = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = np.zeros((len(unique_templates), feats.shape[1]))
    np.add.at(template_sum, template_index, media_mean)
    return unique_templates, normalize(template_sum)


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each template pair (features are unit rows), in chunks."""
    rows = np.searchsorted(template_ids, pairs)
    scores = np.empty(len(pairs))
    for start in range(0, len(pairs), SCORE_CHUNK):
        r = rows[start:start + SCORE_CHUNK]
        scores[start:start + len(r)] = np.einsum("ij,ij->i", template_feats[r[:, 0]], template_feats[r[:, 1]])
    return scores


def tar_at_far(labels: np.ndarray, scores: np.ndarray, far_targets=FAR_TARGETS) -> list[dict[str, float]]:
    """Two readings of the ROC per target FAR.

    `tar` (reported, InsightFace's): on sklearn's `roc_curve` (collinear points dropped), the point whose FAR is
    closest to the target, the largest TAR among equally close ones; `far` and `threshold` are that point's.
    `tar_far_le_target`: the largest TAR whose FAR does not exceed the target -- never optimistic, but not what
    published IJB tables use. They differ only where the ROC is coarser than the target FAR (small sets).
    """
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fpr, tpr, thresholds = fpr[::-1], tpr[::-1], thresholds[::-1]
    rows = []
    for target in far_targets:
        i = int(np.argmin(np.abs(fpr - target)))
        rows.append({"far_target": target, "tar": float(tpr[i]), "far": float(fpr[i]),
                     "threshold": float(thresholds[i]), "tar_far_le_target": float(tpr[fpr <= target].max())})
    return rows


def format_table(target: str, rows: list[dict[str, float]]) -> str:
    header = "| " + " | ".join(f"{r['far_target']:.0e}" for r in rows) + " |"
    values = "| " + " | ".join(f"{100 * r['tar']:5.2f}" for r in rows) + " |"
    return f"{target} TAR (%) at FAR\n{header}\n{values}"


def write_outputs(out_dir: Path, target: str, rows: list[dict[str, float]], labels: np.ndarray,
                  scores: np.ndarray) -> dict[str, Path]:
    """<target>_tar_far.csv, <target>_roc.png and <target>_scores.npy (per pair, in the pair file's order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = output_paths(out_dir, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(paths["csv"], text.getvalue().encode())

    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.semilogx(np.maximum(fpr, 1e-7), tpr, label=f"{target} (TAR@FAR=1e-4: {100 * _tar(rows, 1e-4):.2f}%)")
    ax.set(xlim=(1e-6, 1), ylim=(0, 1), xlabel="False Accept Rate", ylabel="True Accept Rate", title=f"{target} ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(paths["png"], png.getvalue())

    npy = io.BytesIO()
    np.save(npy, scores)
    write_bytes_atomic(paths["scores"], npy.getvalue())
    return paths


def _tar(rows: list[dict[str, float]], far_target: float) -> float:
    return next((r["tar"] for r in rows if r["far_target"] == far_target), float("nan"))


def output_paths(out_dir: Path, target: str) -> dict[str, Path]:
    name = target.lower()
    return {"csv": out_dir / f"{name}_tar_far.csv", "png": out_dir / f"{name}_roc.png",
            "scores": out_dir / f"{name}_scores.npy"}


def evaluate_ijb(model, data_dir: str | Path, target: str, batch_size: int = 128, flip: bool = True,
                 detector_score: bool = True, workers: int = 4, progress: bool = True):
    """Meta -> face features -> template features -> pair scores -> TAR@FAR rows. Returns (rows, labels, scores)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir, target)
    image_dir = data_dir / "loose_crop"
    check_images(image_dir, meta.image_names)
    feats = image_features(model, image_dir, meta, batch_size, flip, workers, progress)
    if detector_score:
        feats = feats * meta.faceness[:, None]
    template_ids, template_feats = template_features(feats, meta.templates, meta.medias)
    scores = pair_scores(template_ids, template_feats, meta.pairs)
    return tar_at_far(meta.labels, scores), meta.labels, scores


def main(argv: list[str] | None = None) -> int:
    start_program()  # before paddle is imported
    parser = argparse.ArgumentParser(description="IJB-B/IJB-C 1:1 verification: TAR at FAR 1e-6..1e-1, ROC plot.")
    parser.add_argument("--data", required=True, help="the IJB_release/IJBB or IJB_release/IJBC directory")
    parser.add_argument("--target", required=True, help="IJBB or IJBC (prefix of the meta file names)")
    parser.add_argument("--network", required=True, help="backbone name (r18 r34 r50 r100 r200 mbf mbf_large)")
    parser.add_argument("--weights", required=True, help="backbone .pdparams (loaded without unpickling code)")
    parser.add_argument("--out", required=True, help="output directory for the CSV, ROC PNG and scores")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="faces per forward pass")
    parser.add_argument("--width", type=positive_float, default=1.0, help="channel-width multiplier of the backbone")
    parser.add_argument("--embedding-size", type=positive_int, default=512, help="embedding size of the backbone")
    parser.add_argument("--workers", type=positive_int, default=4, help="threads reading and aligning images")
    parser.add_argument("--no-flip", action="store_true", help="do not add the mirrored crop's embedding")
    parser.add_argument("--no-detector-score", action="store_true",
                        help="do not weight face features by the detector score")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = parser.parse_args(argv)

    out_dir = Path(args.out)
    existing = [str(p) for p in output_paths(out_dir, args.target).values() if p.exists()]
    if existing and not args.force:
        parser.error(f"{', '.join(existing)} exists; use --force to overwrite")
    return exit_on_user_error(lambda: evaluate_and_write(args, out_dir))


def evaluate_and_write(args: argparse.Namespace, out_dir: Path) -> int:
    """The evaluation main() asked for: embed, score, write the table, ROC and scores; print the table."""
    from deploy.embedder import load_backbone

    check_writable(out_dir, folder=True)
    model = load_backbone(args.network, args.weights, args.width, args.embedding_size)
    rows, labels, scores = evaluate_ijb(model, args.data, args.target, args.batch_size, not args.no_flip,
                                        not args.no_detector_score, args.workers)
    paths = write_outputs(out_dir, args.target, rows, labels, scores)
    print(format_table(args.target.upper(), rows))
    print(f"wrote {paths['csv']}, {paths['png']}, {paths['scores']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
