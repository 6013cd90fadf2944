"""Which samples a rank trains on, in which order, and which of them are mirrored: pure functions of (seed,
epoch, index), so batches do not depend on the worker count and a resumed run continues exactly.

`ShardedBatchSampler` draws one permutation per epoch from (seed, epoch) and gives every rank a disjoint slice
of each global batch; its `state_dict()` is the resume position. `flip_mask` says which samples of an epoch are
mirrored (arcface_torch's only augmentation) with a hash of (seed, epoch, index) that every worker and rank
computes alike. `mix64` is the hash itself, also used to spread the samples tried in place of a bad one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-mixed 64-bit hash."""
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def flip_mask(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Which of samples `indices` are mirrored in `epoch`: a pure function of (seed, epoch, index), the same in
    every worker and rank, one vectorised hash per batch."""
    mask = (1 << 64) - 1
    salt = mix64(mix64(np.array([seed & mask], np.uint64)) ^ np.uint64(epoch & mask))
    return (mix64(salt ^ np.asarray(indices).astype(np.uint64)) >> 63).astype(bool)


class ShardedBatchSampler:
    """Distributed, seeded, epoch-aware batch sampler with an exact-resume position.

    Epoch e draws one permutation of all samples from (seed, e); global batch g is its slice
    [g*B*W, (g+1)*B*W) and rank r takes the r-th B of it, so ranks are disjoint and every rank has
    the same number of batches (the incomplete tail is dropped). Items are (index, epoch) pairs so that
    workers flip by epoch without any shared state. The position counts batches *handed to the training
    loop* (FaceDataLoader reports them), not batches prefetched by workers.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if num_samples < batch_size * world_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {batch_size} x {world_size} ranks")
        self.num_samples, self.batch_size, self.rank, self.world_size, self.seed = (
            num_samples, batch_size, rank, world_size, seed)
        self.epoch = 0
        self.consumed = 0  # batches of this epoch already handed to the training loop
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. Setting the current epoch again keeps the position (resume-friendly)."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return self._perm[1]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = self.epoch, self.permutation(self.epoch)
        global_batch = self.batch_size * self.world_size
        for b in range(self.consumed, len(self)):
            start = b * global_batch + self.rank * self.batch_size
            yield [(i, epoch) for i in perm[start:start + self.batch_size].tolist()]

    def mark_consumed(self) -> None:
        """One more batch reached the training loop; after the last one the next epoch begins."""
        self.consumed += 1
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.consumed, "seed": self.seed, "num_samples": self.num_samples,
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; a different world size resumes at the same sample if global batches divide."""
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data-loader state is for {key}={state[key]}, this loader has {getattr(self, key)}")
        seen = state["batch"] * state["global_batch"]
        global_batch = self.batch_size * self.world_size
        if seen % global_batch:
            warnings.warn(f"resuming with global batch {global_batch} instead of {state['global_batch']}: "
                          f"{seen % global_batch} samples of the epoch are skipped", stacklevel=2)
        self.epoch, self.consumed = state["epoch"], seen // global_batch
