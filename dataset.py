"""Training datasets (InsightFace RecordIO, image folders, the built-in synthetic faces) and the DataLoader.

Every dataset returns `(CHW float32 RGB normalised as utils.image.preprocess, np.int64 label)`; training sets
flip horizontally with probability 1/2 (arcface_torch's only augmentation). The flip of sample `i` in epoch `e`
is a hash of (seed, e, i), so it does not depend on the worker count or on where a resumed run restarts.

`build_dataloader` returns a `FaceDataLoader`: a paddle.io.DataLoader whose workers read, decode and flip into
uint8 batches that the training process normalises with one table lookup per pixel (see FaceDataLoader). Its
`batch_sampler` is a `ShardedBatchSampler`: seeded, epoch-aware, one disjoint slice of the same permutation per
rank, and a `state_dict()` that resumes exactly at the next unconsumed batch.

Images that are not 112x112 are resized (with one warning per dataset and process): aligned crops of another
size (128x128 folders, rec2images output of other sets) scale to the ArcFace template exactly. `strict=True`
turns that, and undecodable payloads, into errors; by default an undecodable image is reported with its key
and replaced by the next decodable sample, so one bad record in 5M does not stop a week-long run.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import pickle
import signal
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paddle
from paddle.utils.dlpack import from_dlpack

from mxnet_reader.recordio import MXIndexedRecordIO, RecordIOError, unpack
from utils.image import INPUT_SIZE, decode_rgb, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MAX_SUBSTITUTES = 64  # consecutive undecodable samples tolerated before giving up
_SPARE_BUFFERS = 2  # float32 batch arrays kept for reuse: one in training, one being filled (see _LentBuffer)
# The normalisation table, read off `preprocess` itself so the batched path can never disagree with it.
_TABLE = preprocess(np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2))[0, 0].copy()
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixed 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def flip_of(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is mirrored in `epoch`: a pure function, the same in every worker and rank."""
    return bool(_mix64(_mix64(_mix64(seed & _M64) ^ (epoch & _M64)) ^ (index & _M64)) >> 63)


def normalise_uint8(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB CHW (or NCHW) -> float32 of the same shape (into `out` if given), values identical to
    utils.image.preprocess.

    Table lookups on blocks just under 2^18 pixels: OpenCV runs smaller LUT calls on the calling thread, so its
    thread pool never has to share the CPU with training nor survive a fork into loader workers, and blocks
    this size cost less Python than one call per image.
    """
    out = np.empty(images.shape, dtype=np.float32) if out is None else out
    width = images.shape[-1]
    src, dst = np.ascontiguousarray(images).reshape(-1, width), out.reshape(-1, width)
    rows = (1 << 18) // width - 1
    for start in range(0, len(src), rows):
        cv2.LUT(src[start:start + rows], _TABLE, dst=dst[start:start + rows])
    return out


class FaceDataset(paddle.io.Dataset):
    """Shared decoding, flipping, label checks and bad-sample policy; subclasses say where samples come from."""

    def __init__(self, source: str, train: bool, strict: bool, seed: int) -> None:
        self.source = source
        self.train = train
        self.strict = strict
        self.seed = seed
        self.epoch = 0
        self.num_classes = 0
        self._warned_size = False

    # subclasses: number of samples, and sample i -> (encoded image, label, name of the sample for messages)
    def __len__(self) -> int:
        raise NotImplementedError

    def _sample(self, index: int) -> tuple[bytes, int, str]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by `dataset[i]` for its flips (the DataLoader passes the epoch with each index instead)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        image, label = self.load_uint8(index, self.epoch)
        return normalise_uint8(image), label

    def load_uint8(self, index: int, epoch: int) -> tuple[np.ndarray, np.int64]:
        """Sample `index` as (3xHxW uint8 RGB, flipped if training, label)."""
        chw = np.empty((3, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
        return chw, np.int64(self._load_into(index, epoch, chw))

    def load_batch(self, indices: np.ndarray, epoch: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Samples `indices` of `epoch` into images[:n] (uint8 Nx3xHxW) and labels[:n]: a loader worker's job."""
        for j, index in enumerate(indices.tolist()):
            labels[j] = self._load_into(index, epoch, images[j])

    def _load_into(self, index: int, epoch: int, chw: np.ndarray) -> int:
        """Decode sample `index` (or its substitute) into the uint8 3xHxW array `chw`; return its label."""
        n, index = self._length, int(index)  # NumPy integers too
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples in {self.source}")
        for attempt in range(_MAX_SUBSTITUTES):
            i = (index + attempt) % n
            payload, label, name = self._sample(i)
            if not 0 <= label < self.num_classes:
                raise ValueError(f"{self.source}: {name} has label {label} outside [0, {self.num_classes}) "
                                 "(pass num_classes= or fix the property file)")
            try:
                image = decode_rgb(payload)
            except ValueError:
                if self.strict:
                    raise ValueError(f"{self.source}: {name} is not a decodable image") from None
                warnings.warn(f"{self.source}: {name} is not a decodable image; using sample {(i + 1) % n} instead",
                              stacklevel=3)
                continue
            cv2.split(self._checked_size(image, name), list(chw))
            if self.train and flip_of(self.seed, epoch, index):
                rows = chw.reshape(-1, chw.shape[-1])  # mirroring every row of the three planes, in place
                cv2.flip(rows, 1, dst=rows)
            return label
        raise ValueError(f"{self.source}: {_MAX_SUBSTITUTES} consecutive samples from index {index} are undecodable")

    def _checked_size(self, image: np.ndarray, name: str) -> np.ndarray:
        if image.shape[:2] == (INPUT_SIZE, INPUT_SIZE):
            return image
        if self.strict:
            raise ValueError(f"{self.source}: {name} is {image.shape[1]}x{image.shape[0]}, expected "
                             f"{INPUT_SIZE}x{INPUT_SIZE} aligned crops")
        if not self._warned_size:
            self._warned_size = True
            warnings.warn(f"{self.source}: {name} is {image.shape[1]}x{image.shape[0]}; resizing images to "
                          f"{INPUT_SIZE}x{INPUT_SIZE} (further resizes are silent)", stacklevel=4)
        shrink = image.shape[0] > INPUT_SIZE
        return cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def _finish(self, num_classes: int | None) -> None:
        self._length = len(self)
        if self._length == 0:
            raise ValueError(f"no images found in {self.source}")
        if num_classes is None or num_classes < 1:
            raise ValueError(f"{self.source}: cannot tell the number of classes; pass num_classes=")
        self.num_classes = int(num_classes)


class RecordIODataset(FaceDataset):
    """An InsightFace `train.rec`/`train.idx` directory (MS1M, Glint360K, WebFace, ...), read without mxnet.

    With a header record 0 (label [a, b]) the images are keys 1..a-1 and the identities keys a..b-1; the
    float32 bounds are exact only below 2^24, so they are pinned against the index and the records around
    them (WebFace42M has 42M keys). Without one (shuffled sets) the images are the index keys in file order.
    Labels come from each image's IRHeader, as in arcface_torch. num_classes: the argument, else the
    `property` file, else the identity-record count, else a scan of every header.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, strict: bool = False,
                 num_classes: int | None = None, seed: int = 0) -> None:
        root = Path(root)
        super().__init__(str(root), train, strict, seed)
        rec, idx = root / "train.rec", root / "train.idx"
        for path in (rec, idx):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (expected an InsightFace dataset directory)")
        self._reader = MXIndexedRecordIO(idx, rec, "r")
        self._keys, identities = self._image_keys()
        if num_classes is None:
            num_classes = _read_property(root) or identities or self._scan_num_classes()
        self._finish(num_classes)

    def __len__(self) -> int:
        return len(self._keys)

    def _sample(self, index: int) -> tuple[bytes, int, str]:
        key = int(self._keys[index])
        header, payload = unpack(self._reader.read_idx(key))
        label = header.label if header.flag == 0 else header.label[0]
        if label != int(label):
            raise ValueError(f"{self.source}: key {key} has a non-integer label {label}")
        return payload, int(label), f"key {key}"

    def _image_keys(self) -> tuple[range | np.ndarray, int | None]:
        """(keys of the image records, number of identity records or None)."""
        reader = self._reader
        if 0 in reader:
            header, payload = unpack(reader.read_idx(0))
            if header.flag >= 2 and not payload:
                first_identity = self._pinned_bound(float(header.label[0]), self._is_header_record, "image")
                end = self._pinned_bound(float(header.label[1]), lambda k: k not in reader, "identity")
                return range(1, first_identity), end - first_identity
        return reader.key_array, None

    def _is_header_record(self, key: int) -> bool:
        """Identity (and header) records carry a label range and no image; keys past the index count too."""
        if key not in self._reader:
            return True
        header, payload = unpack(self._reader.read_idx(key))
        return header.flag >= 2 and not payload

    def _pinned_bound(self, approx: float, is_past: Callable[[int], bool], what: str) -> int:
        bound = exact_bound(approx, is_past)
        if bound is None:
            raise RecordIOError(f"{self.source}: header record 0 puts the end of the {what} records at key "
                                f"{approx:.0f}, but the index and records disagree within float32 rounding of it")
        return bound

    def _scan_num_classes(self) -> int:
        """No header record and no property file: the largest label + 1 over every record (one pass)."""
        top = -1
        for key in self._keys:
            header, _ = unpack(self._reader.read_idx(int(key)))
            top = max(top, int(header.label if header.flag == 0 else header.label[0]))
        return top + 1


def exact_bound(approx: float, is_past: Callable[[int], bool]) -> int | None:
    """The key k with is_past(k) and not is_past(k - 1) within float32 rounding of `approx`, or None.

    Header records store key bounds as float32, exact only below 2^24: 42,474,557 reads back as 42,474,556.
    """
    spacing = int(np.spacing(np.float32(approx)))
    for k in range(max(1, int(approx) - spacing), int(approx) + spacing + 1):
        if is_past(k) and not is_past(k - 1):
            return k
    return None


def _read_property(root: Path) -> int | None:
    """num_classes from InsightFace's `property` file (`num_classes,height,width`), if there is one."""
    path = root / "property"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8").strip()
    try:
        return int(text.split(",")[0])
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {text[:60]!r}") from None


class ImageFolderDataset(FaceDataset):
    """Aligned face crops on disk: `root/label.txt` (`relative/path<TAB or space>label` per line) if present,
    otherwise `root/<identity>/<image>` with identities in sorted order as labels 0..K-1."""

    def __init__(self, root: str | os.PathLike, train: bool = True, strict: bool = False,
                 num_classes: int | None = None, seed: int = 0) -> None:
        root = Path(root)
        super().__init__(str(root), train, strict, seed)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        listing = root / "label.txt"
        self._paths, labels = _read_label_file(listing) if listing.is_file() else _scan_identity_folders(root)
        self._root = root
        self._labels = np.asarray(labels, dtype=np.int64)
        if num_classes is None and len(self._labels):
            num_classes = int(self._labels.max()) + 1
        self._finish(num_classes)
        bad = np.flatnonzero((self._labels < 0) | (self._labels >= self.num_classes))
        if len(bad):
            raise ValueError(f"{self.source}: {self._paths[bad[0]]} has label {self._labels[bad[0]]} outside "
                             f"[0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self._paths)

    def _sample(self, index: int) -> tuple[bytes, int, str]:
        path = self._root / self._paths[index]
        try:
            payload = path.read_bytes()
        except OSError as err:
            if self.strict:
                raise
            warnings.warn(f"cannot read {path}: {err}", stacklevel=3)
            payload = b""  # reported again as undecodable, then replaced
        return payload, int(self._labels[index]), str(self._paths[index])


def _read_label_file(path: Path) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rsplit(None, 1)
        try:
            if len(fields) != 2:
                raise ValueError
            labels.append(int(fields[1]))
        except ValueError:
            raise ValueError(f"{path}: line {number} is not 'path<TAB>label': {line[:80]!r}") from None
        paths.append(fields[0].strip())
    return paths, labels


def _scan_identity_folders(root: Path) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    identities = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    for label, name in enumerate(identities):
        images = sorted(e.name for e in os.scandir(root / name) if e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(f"{name}/{image}" for image in images)
        labels.extend([label] * len(images))
    return paths, labels


class SyntheticFaceDataset(RecordIODataset):
    """The built-in procedural face set (utils.synthetic), generated into `cache_dir` on first use."""

    def __init__(self, cache_dir: str | os.PathLike, identities: int, images_per_id: int, val_pairs: int,
                 seed: int, train: bool = True) -> None:
        from utils.synthetic import ensure_synthetic

        root = ensure_synthetic(cache_dir, identities, images_per_id, val_pairs, seed)
        super().__init__(root, train=train, seed=seed)


# -- factory -------------------------------------------------------------------------------------------------
def dataset_dir(cfg: Any) -> Path:
    """The directory holding train.rec (or the image folder) and the .bin validation sets."""
    if cfg.data == "synthetic":
        from utils.synthetic import ensure_synthetic

        return ensure_synthetic(cfg.cache_dir, cfg.synthetic_identities, cfg.synthetic_images_per_id,
                                cfg.synthetic_val_pairs, cfg.seed)
    return Path(cfg.data)


def build_dataset(cfg: Any, train: bool = True) -> FaceDataset:
    """The dataset named by cfg.data: "synthetic", a RecordIO directory, or an image folder."""
    if cfg.data == "synthetic":
        return SyntheticFaceDataset(cfg.cache_dir, cfg.synthetic_identities, cfg.synthetic_images_per_id,
                                    cfg.synthetic_val_pairs, cfg.seed, train=train)
    root = Path(cfg.data)
    if (root / "train.rec").is_file():
        return RecordIODataset(root, train=train, num_classes=cfg.num_classes, seed=cfg.seed)
    if root.is_dir():
        return ImageFolderDataset(root, train=train, num_classes=cfg.num_classes, seed=cfg.seed)
    raise FileNotFoundError(f"dataset not found: {cfg.data!r} (expected a directory with train.rec/train.idx, "
                            "an image folder, or 'synthetic')")


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

    def __iter__(self):
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


class FaceDataLoader:
    """The training batches of one rank: (float32 [B,3,112,112], int64 [B]) paddle Tensors, `len()` per epoch.

    Worker processes (forked once, on the first iteration, and kept) decode, flip and CHW-split uint8 images
    straight into a ring of shared-memory batch slots allocated before the fork; the training process turns a
    slot into a float32 tensor with one table lookup per pixel and hands the slot back. Nothing is
    mapped, pickled or copied per batch besides that lookup: Paddle's DataLoader maps fresh shared memory for
    every batch, and its page faults cost more than the decoding here (bench/RESULTS.md).
    Batch k goes to worker k % num_workers, so batches arrive in sampler order whatever the worker count.
    A worker that dies or stops answering for `timeout` seconds is an error here, never a hang; `close()`
    (or garbage collection, or interpreter exit) stops the workers. Workers need fork (Linux, macOS): where
    there is none (Windows) batches are loaded in this process, with a warning.
    """

    def __init__(self, dataset: FaceDataset, batch_sampler: ShardedBatchSampler, num_workers: int = 0,
                 prefetch_per_worker: int = 2, timeout: float = 120.0) -> None:
        if num_workers > 0 and "fork" not in multiprocessing.get_all_start_methods():
            warnings.warn("this platform cannot fork: loading batches in the training process", stacklevel=2)
            num_workers = 0
        self.dataset, self.batch_sampler, self.num_workers = dataset, batch_sampler, num_workers
        self.prefetch_per_worker, self.timeout = prefetch_per_worker, timeout
        self._pool: _WorkerPool | None = None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        on_gpu = paddle.device.get_device().startswith("gpu")
        uint8_batches = self._worker_batches() if self.num_workers > 0 else self._local_batches()
        spare: list[np.ndarray] = []  # float32 batch arrays no tensor uses any more
        for images, labels in uint8_batches:
            buffer = spare.pop() if spare else np.empty(images.shape, dtype=np.float32)
            out = from_dlpack(np.asarray(_LentBuffer(normalise_uint8(images, out=buffer), spare)))
            labels = paddle.to_tensor(labels)  # a copy: the slot is reused once this generator resumes
            self.batch_sampler.mark_consumed()
            yield (out.cuda(), labels.cuda()) if on_gpu else (out, labels)

    def close(self) -> None:
        """Stop the workers (a later iteration starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _local_batches(self):
        size = self.batch_sampler.batch_size
        images = np.empty((size, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
        labels = np.empty(size, dtype=np.int64)
        for batch in self.batch_sampler:
            self.dataset.load_batch(np.array([i for i, _ in batch]), batch[0][1], images, labels)
            yield images, labels

    def _worker_batches(self):
        if self._pool is None or not self._pool.close.alive:
            self._pool = _WorkerPool(self.dataset, self.batch_sampler.batch_size, self.num_workers,
                                     self.prefetch_per_worker, self.timeout)
        pool = self._pool
        generation = pool.restart()  # waits out what an abandoned iteration left in flight
        batches = iter(self.batch_sampler)
        for _ in range(pool.num_slots):
            if not pool.submit(next(batches, None)):
                break
        while pool.in_flight:
            slot = pool.receive()
            yield pool.images[slot], pool.labels[slot]
            if pool.generation != generation:
                raise RuntimeError("this loader iterator was abandoned: a newer iteration started")
            pool.submit(next(batches, None))  # into the slot just handed over


class _LentBuffer:
    """A float32 batch array lent to one Paddle tensor, back among the spares when the tensor's storage is freed.

    A fresh 19 MB float32 batch costs ~4,700 page faults (~100 us per image on this VM, more than the lookup
    that fills it) because malloc returns such blocks to the OS when freed. Paddle keeps the exporting NumPy
    array, whose base is this object, alive through the DLPack capsule until the tensor's storage is released,
    autograd graphs included, so a reused array can never alias a batch still in use.
    """

    def __init__(self, array: np.ndarray, spare: list[np.ndarray]) -> None:
        self._array, self._spare = array, spare
        self.__array_interface__ = array.__array_interface__

    def __del__(self) -> None:
        if len(self._spare) < _SPARE_BUFFERS:
            self._spare.append(self._array)


class _WorkerPool:
    """Forked workers and the shared-memory slots they fill; see FaceDataLoader."""

    def __init__(self, dataset: FaceDataset, batch_size: int, num_workers: int, slots_per_worker: int,
                 timeout: float) -> None:
        self.num_workers, self.num_slots, self.timeout = num_workers, num_workers * slots_per_worker, timeout
        image_bytes = self.num_slots * batch_size * 3 * INPUT_SIZE * INPUT_SIZE
        memory = mmap.mmap(-1, image_bytes + self.num_slots * batch_size * 8)  # anonymous, shared with forks
        self.images = np.frombuffer(memory, np.uint8, image_bytes).reshape(
            self.num_slots, batch_size, 3, INPUT_SIZE, INPUT_SIZE)
        self.labels = np.frombuffer(memory, np.int64, self.num_slots * batch_size, image_bytes).reshape(
            self.num_slots, batch_size)
        self.images.fill(0)  # fault every page in now, not during the first batches
        self.generation, self.submitted, self.in_flight = 0, 0, 0
        context = multiprocessing.get_context("fork")
        self._connections, self._processes = [], []
        self.close = weakref.finalize(self, _stop_workers, self._processes, self._connections)
        for w in range(num_workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_loop, name=f"face-loader-{w}", daemon=True,
                                      args=(dataset, self.images, self.labels, theirs, os.getpid()))
            process.start()
            theirs.close()
            self._connections.append(ours)
            self._processes.append(process)

    def restart(self) -> int:
        """Wait out the batches still in flight from an earlier iteration; a new generation starts."""
        while self.in_flight:
            self.receive(raise_dataset_errors=False)
        self.generation += 1
        self.submitted = 0
        return self.generation

    def submit(self, batch: list[tuple[int, int]] | None) -> bool:
        """Send the next batch (or nothing at the end of the epoch) to its worker; True if sent."""
        if batch is None:
            return False
        k, worker = self.submitted, self.submitted % self.num_workers
        task = (k % self.num_slots, np.array([i for i, _ in batch], dtype=np.int64), batch[0][1])
        try:
            self._connections[worker].send(task)
        except OSError:
            raise self._dead(worker) from None
        self.submitted, self.in_flight = k + 1, self.in_flight + 1
        return True

    def receive(self, raise_dataset_errors: bool = True) -> int:
        """The slot of the oldest batch in flight, once its worker has filled it."""
        k = self.submitted - self.in_flight
        worker, connection = k % self.num_workers, self._connections[k % self.num_workers]
        deadline = time.monotonic() + self.timeout
        while not connection.poll(0.1):
            if self._processes[worker].exitcode is not None:
                raise self._dead(worker)
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"loader worker {worker} (pid {self._processes[worker].pid}) sent no batch "
                                   f"for {self.timeout:.0f} s")
        try:
            slot, error = connection.recv()
        except (EOFError, OSError):
            raise self._dead(worker) from None
        self.in_flight -= 1
        if error is not None and raise_dataset_errors:
            raise error
        return slot

    def _dead(self, worker: int) -> RuntimeError:
        """The error for a worker that is gone; the other workers are stopped too."""
        process = self._processes[worker]
        process.join(1.0)
        self.close()
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return RuntimeError(f"loader worker {worker} (pid {process.pid}) {how}; see its output above "
                            "(out of memory? the kernel log says)")


def _worker_loop(dataset: FaceDataset, images: np.ndarray, labels: np.ndarray, connection: Any,
                 parent: int) -> None:
    """A worker: (slot, indices, epoch) -> fill the slot -> (slot, None or the exception). Ends on None, on a
    closed pipe, or when the training process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process, which stops us
    try:
        while True:
            while not connection.poll(1.0):
                if os.getppid() != parent:
                    return
            task = connection.recv()
            if task is None:
                return
            slot, indices, epoch = task
            try:
                dataset.load_batch(indices, epoch, images[slot], labels[slot])
                connection.send((slot, None))
            except Exception as err:  # reported to the training process, which raises it
                err.add_note(f"in loader worker pid {os.getpid()}:\n{traceback.format_exc()}")
                try:
                    pickle.loads(pickle.dumps(err))
                except Exception:  # an exception that does not survive pickling travels as its text
                    err = RuntimeError(f"{type(err).__name__}: {err}\n{err.__notes__[0]}")
                connection.send((slot, err))
    except (EOFError, OSError, KeyboardInterrupt):
        return


def _stop_workers(processes: list, connections: list) -> None:
    for connection in connections:
        with contextlib.suppress(OSError):
            connection.send(None)
    for process in processes:
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
    for connection in connections:
        connection.close()


def build_dataloader(cfg: Any, rank: int, world_size: int, dataset: FaceDataset | None = None) -> FaceDataLoader:
    """The training loader of this rank: cfg.batch_size per rank, cfg.num_workers worker processes."""
    dataset = dataset if dataset is not None else build_dataset(cfg, train=True)
    sampler = ShardedBatchSampler(len(dataset), cfg.batch_size, rank, world_size, cfg.seed)
    return FaceDataLoader(dataset, sampler, num_workers=cfg.num_workers)


__all__ = [
    "FaceDataLoader",
    "FaceDataset",
    "ImageFolderDataset",
    "RecordIODataset",
    "ShardedBatchSampler",
    "SyntheticFaceDataset",
    "build_dataloader",
    "build_dataset",
    "dataset_dir",
    "exact_bound",
    "flip_of",
    "normalise_uint8",
]
