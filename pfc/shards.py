"""Class ranges, the seeded initial centres, and the shard files of a saved head (one .npy per array and rank plus a
manifest.json), read back by any world size: each rank copies the rows of its own range out of the shards it overlaps.

No pickle is ever read (np.load(allow_pickle=False), memory-mapped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from utils.atomic import atomic_output, write_bytes_atomic

MANIFEST = "manifest.json"
SHARD_FILES = {"weight": "softmax_weight", "momentum": "softmax_mom", "exp_avg": "softmax_exp_avg",
               "exp_avg_sq": "softmax_exp_avg_sq"}
_INIT_BLOCK = 4096  # rows per seeded block of the initial matrix: the same full matrix for any world size


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of `rank`: contiguous split, the first num_classes % world_size ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def init_centres(out: np.ndarray, class_start: int, seed: int) -> None:
    """Fill `out` with rows class_start.. of the N(0, 0.01) centre matrix defined by `seed` alone (not by sharding)."""
    stop = class_start + out.shape[0]
    for block in range(class_start // _INIT_BLOCK, -(-stop // _INIT_BLOCK)):
        lo, hi = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        rows = np.random.default_rng([seed, block]).standard_normal((_INIT_BLOCK, out.shape[1]), dtype=np.float32)
        rows *= np.float32(0.01)
        a, b = max(lo, class_start), min(hi, stop)
        out[a - class_start:b - class_start] = rows[a - lo:b - lo]


def write_shard(directory: Path, rank: int, arrays: dict[str, np.ndarray]) -> None:
    """This rank's arrays, one .npy each, atomically (a crash never leaves half a shard)."""
    for name, array in arrays.items():
        with atomic_output(directory / f"{SHARD_FILES[name]}.r{rank}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def write_manifest(directory: Path, *, world_size: int, num_classes: int, embedding_size: int, optimizer: str,
                   names: list[str], num_updates: int, num_draws: int) -> None:
    """manifest.json: what the shards hold and which class range each rank wrote (rank 0 writes it)."""
    shards = [dict(zip(("class_start", "num_local"), shard_range(num_classes, world_size, r), strict=True))
              for r in range(world_size)]
    manifest = {"format": "partial_fc/1", "world_size": world_size, "num_classes": num_classes,
                "embedding_size": embedding_size, "dtype": "float32", "optimizer": optimizer,
                "arrays": {n: SHARD_FILES[n] for n in names}, "num_updates": num_updates, "num_draws": num_draws,
                "shards": shards}
    write_bytes_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"PartialFC.load: cannot read {path}: {exc}") from exc
    required = ("world_size", "num_classes", "embedding_size", "dtype", "optimizer", "arrays", "shards",
                "num_updates", "num_draws")
    missing = [k for k in required if k not in manifest]
    if missing or manifest.get("dtype") != "float32":
        raise ValueError(f"PartialFC.load: {path}: missing keys {missing} or unsupported dtype {manifest.get('dtype')}")
    expected = [shard_range(manifest["num_classes"], manifest["world_size"], r) for r in range(manifest["world_size"])]
    got = [(s.get("class_start"), s.get("num_local")) for s in manifest["shards"]]
    if got != expected:
        raise ValueError(f"PartialFC.load: {path}: shard ranges {got} are not the contiguous split {expected}")
    return manifest


def read_rows(directory: Path, manifest: dict[str, Any], names: list[str], class_start: int, num_local: int,
              embedding_size: int) -> dict[str, np.ndarray]:
    """Rows [class_start, class_start + num_local) of every array in `names`, from the shards that hold them.

    Every overlapping shard is opened and checked before any row is copied, so a bad file changes nothing.
    """
    stop = class_start + num_local
    pieces = []  # (name, rows in target, source memmap, rows in source)
    for name in names:
        for rank, shard in enumerate(manifest["shards"]):
            lo, hi = shard["class_start"], shard["class_start"] + shard["num_local"]
            a, b = max(lo, class_start), min(hi, stop)
            if a >= b:
                continue
            path = directory / f"{manifest['arrays'][name]}.r{rank}.npy"
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"PartialFC.load: cannot read {path}: {exc}") from exc
            if array.shape != (hi - lo, embedding_size) or array.dtype != np.float32:
                raise ValueError(f"PartialFC.load: {path} holds {array.dtype}{list(array.shape)}, manifest says "
                                 f"float32[{hi - lo}, {embedding_size}]")
            pieces.append((name, slice(a - class_start, b - class_start), array, slice(a - lo, b - lo)))
    out = {name: np.empty((num_local, embedding_size), np.float32) for name in names}
    for name, target_rows, array, source_rows in pieces:
        out[name][target_rows] = array[source_rows]
    return out
