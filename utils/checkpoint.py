"""Atomic training checkpoints: write everything into a temp directory, fsync, rename, then point `latest` at it.

Layout of `RUN/checkpoints/step_0001234/`:
    backbone.pdparams        backbone weights (paddle.save; read back with the restricted unpickler)
    optimizer.pdopt          backbone optimizer state + LR schedule, keyed by structured parameter names
    manifest.json, *.npy     Partial FC centre shards per rank (pfc.save; re-shards to another world size)
    trainer_state.json       step, epoch, sampler position, AMP scaler, world size
    rng.r{rank}.json         python / numpy / paddle RNG state of each rank
    config.json              the run's resolved config
`RUN/checkpoints/latest` holds the name of the newest complete checkpoint and is replaced atomically after the
rename, so a process killed at any point leaves `latest` naming a complete checkpoint (or no `latest` at all).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from utils import atomic
from utils.atomic import fsync_path, write_text_atomic
from utils.distributed import barrier
from utils.safe_pickle import load_paddle_state
from utils.weights import load_weights

CHECKPOINTS = "checkpoints"
LATEST = "latest"
# Keys a checkpoint must share with the config that resumes it (other keys, e.g. lr or val_every, may change).
MUST_MATCH = ("network", "width", "embedding_size", "num_classes", "optimizer")
# Test hook: seconds to sleep between the files of a checkpoint, so a test can SIGKILL a writer mid-way.
WRITE_DELAY_VARIABLE = "ARCFACE_CHECKPOINT_WRITE_DELAY"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _test_delay() -> None:
    """The crash test's window between two files (read when writing, so importing reads no environment)."""
    delay = float(os.environ.get(WRITE_DELAY_VARIABLE, "0"))
    if delay:
        time.sleep(delay)


def _written(path: Path) -> None:
    """Flush a file just written inside the checkpoint (and give the crash test its window)."""
    fsync_path(path)
    _test_delay()


def save_paddle_atomic(obj: Any, path: Path) -> None:
    """paddle.save to a temp name in the same directory, fsync, os.replace (e.g. model.pdparams)."""
    with atomic.atomic_output(path) as tmp:
        paddle.save(obj, str(tmp))


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and paddle RNG state as JSON-able data."""
    np_state = np.random.get_state()
    return {"python": _to_lists(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "paddle": [list(g.__getstate__()) for g in paddle.get_rng_state()]}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    from paddle.base.libpaddle import GeneratorState  # pickle's own way to rebuild one: __new__ + __setstate__

    generators = []
    for saved in state["paddle"]:
        gen = GeneratorState.__new__(GeneratorState)
        gen.__setstate__(tuple(saved))
        generators.append(gen)
    paddle.set_rng_state(generators)


def _to_lists(obj: Any) -> Any:
    return [_to_lists(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _param_names(model: paddle.nn.Layer) -> dict[str, str]:
    """Paddle's unique parameter name -> structured name (`linear_3.w_0` -> `fc.weight`)."""
    return {p.name: name for name, p in model.named_parameters()}


def _rekey(state: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """Rename optimizer accumulators `<param name>_<acc>` through `mapping` (longest matching name wins)."""
    names = sorted(mapping, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        match = next((n for n in names if key.startswith(n + "_")), None)
        out[key if match is None else mapping[match] + key[len(match):]] = value
    return out


def optimizer_state(optimizer: paddle.optimizer.Optimizer, model: paddle.nn.Layer) -> dict[str, Any]:
    """The optimizer state with accumulators keyed by structured names, so it loads into any fresh process."""
    return _rekey(optimizer.state_dict(), _param_names(model))


def set_optimizer_state(optimizer: paddle.optimizer.Optimizer, model: paddle.nn.Layer, state: dict[str, Any]) -> None:
    inverse = {structured: unique for unique, structured in _param_names(model).items()}
    optimizer.set_state_dict(_rekey(state, inverse))


def save_checkpoint(run_dir: Path, step: int, *, backbone: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer,
                    pfc: Any, trainer_state: dict[str, Any], cfg: Any, rank: int, world: int, keep: int) -> Path:
    """Write checkpoint `step` atomically (every rank calls this; all write their shards, rank 0 the rest)."""
    root = run_dir / CHECKPOINTS
    final = root / step_name(step)
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(world)
    try:  # a full disk's error names no file: name the checkpoint
        pfc.save(tmp)
        _test_delay()
        (tmp / f"rng.r{rank}.json").write_text(json.dumps(rng_state()))
        _written(tmp / f"rng.r{rank}.json")
        if rank == 0:
            paddle.save(backbone.state_dict(), str(tmp / "backbone.pdparams"))
            _written(tmp / "backbone.pdparams")
            paddle.save(optimizer_state(optimizer, backbone), str(tmp / "optimizer.pdopt"))
            _written(tmp / "optimizer.pdopt")
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, "world_size": world}))
            _written(tmp / "trainer_state.json")
            (tmp / "config.json").write_text(cfg.to_json())
            _written(tmp / "config.json")
    except OSError as e:
        raise atomic.with_path(e, final) from e
    barrier(world)  # every rank's shards are on disk
    if rank == 0:
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # the same step written before (e.g. a resumed run): retire the old copy first
            _discard(final)
        os.rename(tmp, final)
        fsync_path(root)
        write_text_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep, final.name)
    barrier(world)
    return final


def _discard(path: Path) -> None:
    """Rename out of the `step_*` namespace first, so a half-deleted directory never looks like a checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path, keep: int, latest: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name != latest:
            _discard(old)


def clean_stale(run_dir: Path) -> None:
    """Remove temp / trash directories a killed writer left behind (rank 0, before training)."""
    for junk in (run_dir / CHECKPOINTS).glob(".*_step_*"):
        shutil.rmtree(junk, ignore_errors=True)


def resolve_checkpoint(spec: str, run_dir: Path) -> Path:
    """`latest` (this run's newest), a run directory, a checkpoints directory or a checkpoint directory."""
    base = run_dir if spec == LATEST else Path(spec)
    for root in (base / CHECKPOINTS, base):
        pointer = root / LATEST
        if pointer.is_file():
            ckpt = root / pointer.read_text().strip()
            if not (ckpt / "trainer_state.json").is_file():
                raise FileNotFoundError(f"{pointer}: names {ckpt.name}, which is not a complete checkpoint")
            return ckpt
    if (base / "trainer_state.json").is_file():
        return base
    raise FileNotFoundError(f"--resume {spec}: no checkpoint found in {base} "
                            f"(expected {base / CHECKPOINTS / LATEST} or a step_* directory)")


def check_compatible(ckpt: Path, cfg: Any) -> None:
    """ValueError (one line) if the checkpoint was trained with another model or head than `cfg` (a config.Config)."""
    saved = json.loads((ckpt / "config.json").read_text())
    diffs = [f"{k}={saved.get(k)!r} (this run: {cfg[k]!r})" for k in MUST_MATCH if saved.get(k) != cfg[k]]
    if diffs:
        raise ValueError(f"checkpoint {ckpt} does not match the config: {', '.join(diffs)}")


def load_checkpoint(ckpt: Path, *, backbone: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer, pfc: Any,
                    rank: int) -> dict[str, Any]:
    """Restore weights, optimizer, schedule, centres (re-sharded if the world size changed) and this rank's RNG.

    Returns the trainer state (step, epoch, sampler, scaler, world_size).
    """
    load_weights(backbone, ckpt / "backbone.pdparams")
    set_optimizer_state(optimizer, backbone, load_paddle_state(ckpt / "optimizer.pdopt"))
    pfc.load(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rng_file = ckpt / f"rng.r{rank}.json"
    if rng_file.is_file():  # absent when this rank did not exist in the saved run
        set_rng_state(json.loads(rng_file.read_text()))
    return state
