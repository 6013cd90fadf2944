"""Which classes a step uses: every positive class of this shard plus seeded random negatives, the same on both
backends, so a resumed run (and the other backend) draws exactly the same classes.

Sample size: a function of shapes only, never of the labels, so the device never has to tell the host how many
positives a batch had. S = num_local when sample_rate = 1, else max(int(sample_rate * num_local), min(global batch,
num_local)): the sample always has room for every positive (a batch of N samples has at most N distinct classes).
arcface_torch takes max(num_sample, #positives) instead; the two differ only when num_sample < the global batch
(toy heads), where ours adds random negatives up to min(N, num_local).

Scores: class i of draw (seed, rank, draw) gets a 32-bit score from two rounds of an integer avalanche mix of i,
keyed by 64 bits of numpy.random.SeedSequence([seed, rank, draw]). The multipliers are below 2^31, so the same
integers come out of NumPy uint32 arithmetic and of Paddle int64 arithmetic on any device (products stay below
2^63). Every step of the mix is a bijection on 32-bit integers: scores never tie, so the chosen set does not depend
on how a top-k kernel breaks ties. Positives get score -1; the S smallest scores are kept, in class order.
"""

from __future__ import annotations

import numpy as np
import paddle

_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)  # hash-prospector's low-bias 32-bit mix (shifts 16, 15, 15)
_SHIFTS = (16, 15, 15)
_MOD = 1 << 32


def sample_size(num_local: int, sample_rate: float, global_batch: int) -> int:
    """Classes this rank uses per step (num_local = all of them, no sampling)."""
    num_sample = int(sample_rate * num_local)
    if num_sample >= num_local:
        return num_local
    return max(num_sample, min(global_batch, num_local))


def draw_keys(seed: int, rank: int, draw: int) -> tuple[int, int]:
    """The two 32-bit keys of one draw (host integers: no device value is involved)."""
    k0, k1 = np.random.SeedSequence([seed, rank, draw]).generate_state(2, np.uint32)
    return int(k0), int(k1)


def scores_numpy(count: int, keys: tuple[int, int]) -> np.ndarray:
    """int64 scores of classes 0..count-1 (uint32 arithmetic wraps mod 2^32 by itself)."""
    h = np.arange(count, dtype=np.uint32)
    for key in keys:
        h ^= np.uint32(key)
        h ^= h >> np.uint32(_SHIFTS[0])
        h *= np.uint32(_MULTIPLIERS[0])
        h ^= h >> np.uint32(_SHIFTS[1])
        h *= np.uint32(_MULTIPLIERS[1])
        h ^= h >> np.uint32(_SHIFTS[2])
    return h.astype(np.int64)


def scores_paddle(count: int, keys: tuple[int, int]) -> paddle.Tensor:
    """The same scores with Paddle int64 ops on the current device (x // 2^k is x >> k for x >= 0)."""
    h = paddle.arange(count, dtype="int64")
    for key in keys:
        h = h ^ paddle.full([1], key, "int64")
        h = h ^ (h // (1 << _SHIFTS[0]))
        h = (h * _MULTIPLIERS[0]) % _MOD
        h = h ^ (h // (1 << _SHIFTS[1]))
        h = (h * _MULTIPLIERS[1]) % _MOD
        h = h ^ (h // (1 << _SHIFTS[2]))
    return h


def choose_numpy(positives: np.ndarray, num_local: int, size: int, keys: tuple[int, int]) -> np.ndarray | None:
    """Sorted local rows of the sample: the positives + the lowest-scored others (None: all rows)."""
    if size >= num_local:
        return None
    scores = scores_numpy(num_local, keys)
    scores[positives] = -1
    index = np.argpartition(scores, size - 1)[:size]
    index.sort()
    return index


def choose_paddle(local_labels: paddle.Tensor, num_local: int, size: int,
                  keys: tuple[int, int]) -> paddle.Tensor | None:
    """choose_numpy on the device. local_labels: label - class_start of every sample (out of [0, num_local) = not
    this shard's); they land in one spare score slot instead of being filtered out (no data-dependent shape)."""
    if size >= num_local:
        return None
    scores = scores_paddle(num_local + 1, keys)
    spare = paddle.full_like(local_labels, num_local)
    mine = (local_labels >= 0) & (local_labels < num_local)
    paddle.scatter_(scores, paddle.where(mine, local_labels, spare), paddle.full_like(local_labels, -1))
    _, index = paddle.topk(scores[:num_local], size, largest=False)
    return paddle.sort(index)
