"""The built-in synthetic face set: procedural faces (utils/faces.py) written as a real InsightFace-layout dataset.

    python synthetic.py --out DIR --identities 1000 --images-per-id 20 --val-pairs 1000 --seed 2048

writes `train.rec`/`train.idx`/`property` (InsightFace layout, through mxnet_reader) and `synth_val.bin`
(pairs of held-out identities, JPEG-encoded like lfw.bin). The output is byte-identical for a seed.
`ensure_synthetic` generates it once into a cache directory (the default dataset of train.py, tests and benchmarks).
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from eval.bin_io import write_bin
from mxnet_reader.insightface import write_insightface_rec
from utils.atomic import errors_name
from utils.faces import RENDERER_VERSION, render_faces, sample_identity
from utils.image import INPUT_SIZE
from utils.locks import locked_temp_dir, remove_abandoned

JPEG_QUALITY = 95
VAL_BIN_NAME = "synth_val.bin"


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
    images, _ = render_faces(identity, rng, count, INPUT_SIZE)
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
    return f"synthetic-v{RENDERER_VERSION}-i{identities}-k{images_per_id}-p{val_pairs}-s{seed}"


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
