"""Training datasets (InsightFace RecordIO, image folders, the built-in synthetic faces) and the DataLoader.

Every dataset returns `(CHW float32 RGB normalised as utils.image.preprocess, np.int64 label)`; training sets
flip horizontally with probability 1/2 (arcface_torch's only augmentation). The flip of sample `i` in epoch `e`
is a hash of (seed, e, i), so it does not depend on the worker count or on where a resumed run restarts.

`build_dataloader` returns a `FaceDataLoader`, whose workers read, decode and flip into uint8 NxHxWx3 RGB
batches; `to_model_input` turns a batch into the normalised float32 NCHW input on the training device, as the
first step of a training step (on a GPU it costs the host nothing and sends a quarter of the bytes). Its
`batch_sampler` is a `ShardedBatchSampler`: seeded, epoch-aware, one disjoint slice of the same permutation per
rank, and a `state_dict()` that resumes exactly at the next unconsumed batch.

Images that are not 112x112 are resized (with one warning per dataset and process): aligned crops of another
size (128x128 folders, rec2images output of other sets) scale to the ArcFace template exactly. `strict=True`
turns that, and bad samples, into errors; by default a bad sample (a misframed or truncated record, a header
too short, a non-integer label, an unreadable file, an undecodable image) is reported with its file and key and
replaced by a good one drawn from across the set, so one bad record in 5M does not stop a week-long run and a
damaged stretch of a file does not cascade. A label outside [0, num_classes) stays an error: it means the
class count is wrong, which no substitute fixes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paddle
from paddle.utils.dlpack import from_dlpack

from mxnet_reader.recordio import MXIndexedRecordIO, RecordIOError
from utils.encoded_image import claimed_pixels, plausible_size
from utils.image import INPUT_SIZE, decode_or_none, preprocess, preprocess_batch
from utils.label_file import LabelListing, read_label_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MAX_SUBSTITUTES = 64  # samples tried in place of a bad one before the set is called corrupt
_CLASS_SLACK = 1024  # inferred num_classes may exceed twice the labels present by this much (see _plausible_classes)
_IMAGE_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)
_SPARE_ARRAYS = 2  # batch arrays kept for reuse per shape: one in training, one being filled (see _RecycledArrays)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-mixed 64-bit hash."""
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def flip_mask(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Which of samples `indices` are mirrored in `epoch`: a pure function of (seed, epoch, index), the same in
    every worker and rank, one vectorised hash per batch."""
    mask = (1 << 64) - 1
    salt = _mix64(_mix64(np.array([seed & mask], np.uint64)) ^ np.uint64(epoch & mask))
    return (_mix64(salt ^ np.asarray(indices).astype(np.uint64)) >> 63).astype(bool)


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

    # subclasses: number of samples, samples -> (encoded images, int64 labels), and a sample's name for messages
    def __len__(self) -> int:
        raise NotImplementedError

    def _samples(self, indices: np.ndarray) -> tuple[list[bytes | memoryview], np.ndarray]:
        raise NotImplementedError

    def _name(self, index: int) -> str:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by `dataset[i]` for its flips (the DataLoader passes the epoch with each index instead)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        image, label = self.load_uint8(index, self.epoch)
        return preprocess(image), label

    def load_uint8(self, index: int, epoch: int) -> tuple[np.ndarray, np.int64]:
        """Sample `index` as (HxWx3 uint8 RGB, flipped if training, label)."""
        images, labels = np.empty((1, *_IMAGE_SHAPE), dtype=np.uint8), np.empty(1, dtype=np.int64)
        self.load_batch(np.array([index]), epoch, images, labels)
        return images[0], labels[0]

    def load_batch(self, indices: np.ndarray, epoch: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Samples `indices` into images[:n] (uint8 NxHxWx3 RGB, mirrored as `epoch` says if training) and
        labels[:n]: a loader worker's job.

        Every payload and label is fetched first, then each image is decoded in one short loop, a JPEG straight
        into its place in the batch and mirrored there while it is in the cache: beside the decoder, per-image
        work is what separates a worker from the bare-decode ceiling (bench/loader.py).
        """
        indices = np.asarray(indices, dtype=np.int64)
        outside = (indices < 0) | (indices >= self._length)
        if outside.any():
            raise IndexError(f"index {indices[outside][0]} out of range for {self._length} samples in {self.source}")
        payloads, labels[:len(indices)] = self._checked_samples(indices)
        flips = flip_mask(self.seed, epoch, indices).tolist() if self.train else [False] * len(indices)
        for j, (payload, flip, out) in enumerate(zip(payloads, flips, images[:len(indices)], strict=True)):
            image = self._decoded(int(indices[j]), payload, out)
            if isinstance(image, Exception) or image.shape != _IMAGE_SHAPE:
                image, labels[j] = self._repaired(int(indices[j]), image, int(labels[j]))
            if image is not out:
                out[...] = image
            if flip:
                cv2.flip(out, 1, dst=out)

    def _checked_samples(self, indices: np.ndarray) -> tuple[list[bytes | memoryview | Exception], np.ndarray]:
        """_samples, with the labels of the readable ones checked against num_classes."""
        payloads, labels = self._samples(indices)
        readable = np.array([not isinstance(p, Exception) for p in payloads], dtype=bool)
        outside = readable & ((labels < 0) | (labels >= self.num_classes))
        if outside.any():
            j = int(np.flatnonzero(outside)[0])
            raise ValueError(f"{self.source}: {self._name(int(indices[j]))} has label {labels[j]} outside "
                             f"[0, {self.num_classes}) (pass num_classes= or fix the property file)")
        return payloads, labels

    def _decoded(self, index: int, payload: Any, out: np.ndarray | None = None) -> np.ndarray | Exception:
        """Sample `index`'s image (decoded into `out` if it fits there), or why it is a bad sample: the payload's
        own read error, a header claiming more pixels than any face crop (checked before anything is
        allocated for it), or an undecodable image."""
        if isinstance(payload, Exception):
            return payload
        if not plausible_size(payload):
            return ValueError(f"{self.source}: {self._name(index)} claims {claimed_pixels(payload)} pixels in its "
                              "header: a corrupt image")
        image = decode_or_none(payload, out=out)
        return ValueError(f"{self.source}: {self._name(index)} is not a decodable image") if image is None else image

    def _repaired(self, index: int, image: np.ndarray | Exception, label: int) -> tuple[np.ndarray, int]:
        """(image, label) for sample `index`, whose image is not input-sized or is an error: resized, or a good
        sample in its place (both errors when strict)."""
        if not isinstance(image, Exception):
            return self._resized(image, index), label
        if self.strict:
            raise image
        for i in self._substitutes(index):
            payloads, labels = self._checked_samples(np.array([i]))
            substitute = self._decoded(i, payloads[0])
            if not isinstance(substitute, Exception):
                warnings.warn(f"{image}; using sample {i} ({self._name(i)}) instead", stacklevel=4)
                return self._resized(substitute, i), int(labels[0])
        raise ValueError(f"{image}; and none of the {_MAX_SUBSTITUTES} samples tried in its place is readable "
                         f"either: {self.source} looks corrupt (tools/check_dataset.py lists the bad samples)")

    def _substitutes(self, index: int) -> list[int]:
        """The samples tried in place of bad sample `index`: spread over the whole set by a hash of (seed, index),
        so a damaged stretch of a file is not searched record by record, and the same in every worker."""
        if self._length < 2:
            return []
        salt = _mix64(np.array([(self.seed & 0xFFFFFFFF) << 32 | index & 0xFFFFFFFF], dtype=np.uint64))
        draws = _mix64(salt ^ np.arange(_MAX_SUBSTITUTES, dtype=np.uint64)) % np.uint64(self._length - 1)
        return ((index + 1 + draws.astype(np.int64)) % self._length).tolist()

    def _resized(self, image: np.ndarray, index: int) -> np.ndarray:
        """A decoded image, resized to the input size if it has another (an error when strict)."""
        if image.shape == _IMAGE_SHAPE:
            return image
        name = self._name(index)
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
            num_classes = self._property_classes(root, identities) or identities or self._scan_num_classes()
        self._finish(num_classes)

    def __len__(self) -> int:
        return len(self._keys)

    def _samples(self, indices: np.ndarray) -> tuple[list[memoryview | bytes | RecordIOError], np.ndarray]:
        """Payloads are views of the mapped file (no copies); a bad record's payload is its RecordIOError."""
        keys = self._keys[indices] if isinstance(self._keys, np.ndarray) else indices + self._keys.start
        try:
            labels, payloads = self._reader.read_images(keys)
        except RecordIOError:  # a bad record in the batch: read them one by one to tell which
            labels, payloads = np.zeros(len(keys)), []
            for j in range(len(keys)):
                try:
                    labels[j:j + 1], (payload,) = self._reader.read_images(keys[j:j + 1])
                except RecordIOError as err:
                    payload = err
                payloads.append(payload)
        with np.errstate(invalid="ignore"):  # NaN
            wrong = ~(np.abs(labels) < 2.0**62) | (labels != np.floor(labels))
        for j in np.flatnonzero(wrong).tolist():
            payloads[j] = RecordIOError(f"{self._reader.uri} key {keys[j]}: label {labels[j]} is not a class number")
        labels[[isinstance(p, Exception) for p in payloads]] = 0
        return payloads, labels.astype(np.int64)

    def _name(self, index: int) -> str:
        return f"key {self._keys[index]}"

    def _image_keys(self) -> tuple[range | np.ndarray, int | None]:
        """(keys of the image records, number of identity records or None)."""
        reader = self._reader
        if 0 in reader:
            header, payload = reader.read_header(0)
            if header.flag >= 2 and not payload:
                first, end = (float(x) for x in header.label[:2])
                top = int(reader.key_array.max()) + 1
                if not 1 <= first <= end <= top + np.spacing(np.float32(top)):  # NaN fails too
                    raise RecordIOError(f"{reader.uri} key 0: the header record's key range [{first:.0f}, {end:.0f})"
                                        f" is not inside the index {reader.idx_path} (keys end at {top - 1})")
                first_identity = self._pinned_bound(first, self._is_header_record, "image")
                end = self._pinned_bound(end, lambda k: k not in reader, "identity")
                if not reader.covers(1, first_identity):
                    raise RecordIOError(f"{reader.idx_path}: the header record 0 says keys 1..{first_identity - 1} "
                                        "are images, but some of them are not in the index")
                return range(1, first_identity), end - first_identity
        return reader.key_array, None

    def _is_header_record(self, key: int) -> bool:
        """Identity (and header) records carry a label range and no image; keys past the index count too."""
        if key not in self._reader:
            return True
        header, payload = self._reader.read_header(key)
        return header.flag >= 2 and not payload

    def _pinned_bound(self, approx: float, is_past: Callable[[int], bool], what: str) -> int:
        bound = exact_bound(approx, is_past)
        if bound is None:
            raise RecordIOError(f"{self.source}: header record 0 puts the end of the {what} records at key "
                                f"{approx:.0f}, but the index and records disagree within float32 rounding of it")
        return bound

    def _property_classes(self, root: Path, identities: int | None) -> int | None:
        """num_classes from the `property` file, unless it is far more than the identity records (or images)."""
        declared = _read_property(root)
        present = identities or len(self._keys)
        if declared is not None and not _plausible_classes(declared, present):
            raise ValueError(f"{root / 'property'}: {declared} classes, but the set has only {present} "
                             f"{'identities' if identities else 'images'}; fix the file or pass num_classes=")
        return declared

    def _scan_num_classes(self) -> int:
        """No header record and no property file: the largest label + 1 over every record (one pass), checked
        against the number of distinct labels. Unreadable records are skipped here (training reports them)."""
        labels = []
        for start in range(0, len(self._keys), 65536):
            labels.append(self._samples(np.arange(start, min(start + 65536, len(self._keys))))[1])
        labels = np.concatenate(labels)
        j = int(np.argmax(labels))
        distinct = len(np.unique(labels))
        if not _plausible_classes(int(labels[j]) + 1, distinct):
            raise ValueError(f"{self.source}: {self._name(j)} has label {labels[j]}, but the set has only {distinct} "
                             "distinct labels; fix the record or pass num_classes=")
        return int(labels[j]) + 1


def exact_bound(approx: float, is_past: Callable[[int], bool]) -> int | None:
    """The key k with is_past(k) and not is_past(k - 1) within float32 rounding of `approx`, or None.

    Header records store key bounds as float32, exact only below 2^24: 42,474,557 reads back as 42,474,556.
    """
    spacing = int(np.spacing(np.float32(approx)))
    for k in range(max(1, int(approx) - spacing), int(approx) + spacing + 1):
        if is_past(k) and not is_past(k - 1):
            return k
    return None


def _plausible_classes(num_classes: int, present: int) -> bool:
    """Whether an inferred class count fits the identities present: at most twice as many, plus _CLASS_SLACK
    (small sets with gaps). A typo like label 99999999999 would otherwise size a 23 TiB classifier."""
    return num_classes <= 2 * present + _CLASS_SLACK


def _read_property(root: Path) -> int | None:
    """num_classes from InsightFace's `property` file (`num_classes,height,width`), if there is one."""
    path = root / "property"
    if not path.is_file():
        return None
    text = path.read_bytes().decode("utf-8-sig", errors="replace").strip()
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
        listing_file = root / "label.txt"
        listing = image_folder_listing(root)
        self._root = root
        self._paths = listing.paths
        bad = next((j for j, label in enumerate(listing.labels) if not 0 <= label < 1 << 62), None)
        if bad is not None:
            raise ValueError(f"{listing_file}: line {listing.lines[bad]}: label {listing.labels[bad]} is not a "
                             "class number (0, 1, 2, ...)")
        self._labels = np.asarray(listing.labels, dtype=np.int64)
        if num_classes is None and len(self._labels):
            j = int(np.argmax(self._labels))
            num_classes, distinct = int(self._labels[j]) + 1, len(np.unique(self._labels))
            if not _plausible_classes(num_classes, distinct):
                raise ValueError(f"{listing_file}: line {listing.lines[j]}: label {self._labels[j]} would make "
                                 f"{num_classes} classes, but only {distinct} distinct labels are present; number "
                                 "the identities 0..K-1 (tools/images2rec.py does) or pass num_classes=")
        self._finish(num_classes)
        bad = np.flatnonzero(self._labels >= self.num_classes)
        if len(bad):
            raise ValueError(f"{self.source}: {self._paths[bad[0]]} has label {self._labels[bad[0]]} outside "
                             f"[0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self._paths)

    def _samples(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        return [self._read(int(i)) for i in indices], self._labels[indices]

    def _read(self, index: int) -> bytes | OSError:
        """The file's bytes, or why it cannot be read (a bad sample, see FaceDataset._repaired)."""
        path = self._root / self._paths[index]  # an absolute path in label.txt stays absolute
        try:
            return path.read_bytes()
        except OSError as err:
            return OSError(err.errno, f"{self.source}: cannot read {path}: {err.strerror}")  # FileNotFoundError etc.

    def _name(self, index: int) -> str:
        return str(self._paths[index])


def image_folder_listing(root: Path) -> LabelListing:
    """The images of a folder: root/label.txt (utils.label_file) if there is one, else root/<identity>/<image>
    with the identities in sorted order as labels 0..K-1 (line numbers 0)."""
    if (root / "label.txt").is_file():
        return read_label_file(root / "label.txt")
    paths, labels = [], []
    identities = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    for label, name in enumerate(identities):
        images = sorted(e.name for e in os.scandir(root / name) if e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(f"{name}/{image}" for image in images)
        labels.extend([label] * len(images))
    return LabelListing(paths, labels, [0] * len(paths))


class SyntheticFaceDataset(RecordIODataset):
    """The built-in procedural face set (synthetic.py), generated into `cache_dir` on first use."""

    def __init__(self, cache_dir: str | os.PathLike, identities: int, images_per_id: int, val_pairs: int,
                 seed: int, train: bool = True) -> None:
        from synthetic import ensure_synthetic

        root = ensure_synthetic(cache_dir, identities, images_per_id, val_pairs, seed)
        super().__init__(root, train=train, seed=seed)


# -- factory -------------------------------------------------------------------------------------------------
def dataset_dir(cfg: Any) -> Path:
    """The directory holding train.rec (or the image folder) and the .bin validation sets."""
    if cfg.data == "synthetic":
        from synthetic import ensure_synthetic

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
    """The training batches of one rank, `len()` per epoch: (uint8 [B,112,112,3] RGB, int64 [B]) paddle Tensors on
    the training device; `to_model_input` makes the float32 network input of a batch.

    Worker processes (forked once, on the first iteration, and kept) read a batch's records, decode each JPEG
    straight into a shared-memory batch slot (allocated before the fork) and mirror it there. On the CPU the
    training process lends the slot itself to the batch tensor and gives it back to the workers when Paddle
    frees the tensor (if the training loop keeps old batches, so that no other slot is left, it copies
    instead); on a GPU it copies the slot to the device and gives it back at once. Nothing is mapped, pickled
    or copied per batch on the host: Paddle's DataLoader maps fresh shared memory for every batch, and its page
    faults cost more than the decoding here (bench/RESULTS.md).
    Batch k goes to worker k % num_workers, so batches arrive in sampler order whatever the worker count;
    each worker has `prefetch_per_worker` batches in flight plus the one the training loop holds.
    A worker that dies or stops answering for `timeout` seconds is an error here, never a hang; `close()`
    (or garbage collection, or interpreter exit) stops the workers. `start_method` is how workers start: fork
    on Linux (each starts in milliseconds), else spawn (Windows; macOS, where fork is unsafe): a spawned
    worker imports this module (and Paddle, ~3 s) and receives the dataset pickled (the RecordIO reader maps the
    file anew); the slots are then named shared memory instead of an anonymous map.
    """

    def __init__(self, dataset: FaceDataset, batch_sampler: ShardedBatchSampler, num_workers: int = 0,
                 prefetch_per_worker: int = 2, timeout: float = 120.0, start_method: str | None = None) -> None:
        self.dataset, self.batch_sampler, self.num_workers = dataset, batch_sampler, num_workers
        self.prefetch_per_worker, self.timeout = prefetch_per_worker, timeout
        methods = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        if self.start_method not in methods:
            raise ValueError(f"start_method {self.start_method!r} is not available here ({', '.join(methods)})")
        self._pool: _WorkerPool | None = None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        on_gpu = paddle.device.get_device().startswith("gpu")
        uint8_batches = self._worker_batches() if self.num_workers > 0 else self._local_batches()
        for images, labels, release, lendable in uint8_batches:
            labels = paddle.to_tensor(labels)
            if lendable and not on_gpu:
                images = lend(images, release)  # no copy: the memory goes back once the tensor is freed
            else:
                images = paddle.to_tensor(images) if on_gpu else _HOST_ARRAYS.copy(images)
                release()
            self.batch_sampler.mark_consumed()
            yield images, labels

    def close(self) -> None:
        """Stop the workers (a later iteration starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _local_batches(self):
        """(images, labels, release, lendable) of each batch, loaded in this process into a recycled array."""
        size = self.batch_sampler.batch_size
        labels = np.empty(size, dtype=np.int64)
        for batch in self.batch_sampler:
            images = _HOST_ARRAYS.take((size, *_IMAGE_SHAPE), np.uint8)
            self.dataset.load_batch(np.array([i for i, _ in batch]), batch[0][1], images, labels)
            yield images, labels, functools.partial(_HOST_ARRAYS.give_back, images), True

    def _worker_batches(self):
        """(images, labels, release, lendable) of each batch, in a shared-memory slot that `release()` gives back
        to the workers. A slot may be lent to the training loop while other slots keep the workers busy;
        `lendable` is False when the loop already holds every other one (it keeps old batches): copy it then."""
        if self._pool is None or not self._pool.close.alive:
            self._pool = _WorkerPool(self.dataset, self.batch_sampler.batch_size, self.num_workers,
                                     self.prefetch_per_worker + 1, self.timeout, self.start_method)
        pool = self._pool
        generation = pool.restart()  # waits out what an abandoned iteration left in flight
        batches = iter(self.batch_sampler)
        free = pool.free
        while True:
            while free and pool.submit(next(batches, None)):  # every free slot gets the next batch
                pass
            if not pool.in_flight:
                return
            slot = pool.receive()
            lendable = bool(free or pool.in_flight)  # other slots keep the workers busy while the loop holds it
            yield pool.images[slot], pool.labels[slot], functools.partial(free.append, slot), lendable
            if pool.generation != generation:
                raise RuntimeError("this loader iterator was abandoned: a newer iteration started")


def to_model_input(images: paddle.Tensor) -> paddle.Tensor:
    """A loader batch, uint8 [N,H,W,3] RGB, as the network's input: float32 [N,3,H,W] with exactly the values of
    utils.image.preprocess, on the batch's device.

    On a GPU these are Paddle ops. On the CPU, utils.image.preprocess_batch into a recycled array: Paddle's CPU
    kernels take 0.3-0.5 ms per image for the same.
    """
    if not images.place.is_cpu_place():
        return _normalise_with_paddle_ops(images)
    batch = np.from_dlpack(images)
    n, height, width, channels = batch.shape
    return _HOST_ARRAYS.lend(preprocess_batch(batch, out=_HOST_ARRAYS.take((n, channels, height, width), np.float32)))


def _normalise_with_paddle_ops(images: paddle.Tensor) -> paddle.Tensor:
    """to_model_input on an accelerator: preprocess's float32 arithmetic, `(x / 255 - 0.5) / 0.5`."""
    x = images.astype("float32").transpose([0, 3, 1, 2])
    return (x / 255.0 - 0.5) / 0.5


class _RecycledArrays:
    """Host batch arrays lent to Paddle tensors and taken back once a tensor's storage is freed.

    A fresh 19 MB float32 batch costs ~4,700 page faults (~100 us per image on this VM, more than the work
    that fills it) because malloc returns such blocks to the OS when freed.
    """

    def __init__(self) -> None:
        self._spare: dict[tuple, list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An array of this shape and dtype, recycled if one is free (its contents are stale)."""
        spare = self._spare.get((tuple(shape), np.dtype(dtype)))
        return spare.pop() if spare else np.empty(shape, dtype=dtype)

    def give_back(self, array: np.ndarray) -> None:
        spare = self._spare.setdefault((array.shape, array.dtype), [])
        if len(spare) < _SPARE_ARRAYS:
            spare.append(array)

    def lend(self, array: np.ndarray) -> paddle.Tensor:
        """A CPU tensor on `array`'s memory; the array is recycled when the tensor's storage is freed."""
        return lend(array, lambda: self.give_back(array))

    def copy(self, array: np.ndarray) -> paddle.Tensor:
        """A CPU tensor holding a copy of `array`, in a recycled array."""
        out = self.take(array.shape, array.dtype)
        np.copyto(out, array)
        return self.lend(out)


def lend(array: np.ndarray, on_release: Callable[[], None]) -> paddle.Tensor:
    """A CPU tensor on `array`'s memory (no copy); `on_release()` runs when Paddle frees the tensor's storage.

    Paddle keeps the exporting object alive through the DLPack capsule until the storage is released, autograd
    graphs included, so memory handed back by `on_release` can never alias a tensor still in use.
    """
    return from_dlpack(np.asarray(_Lent(array, on_release)))


class _Lent:
    """The exporter of a lent array: reports when Paddle lets go of it."""

    def __init__(self, array: np.ndarray, on_release: Callable[[], None]) -> None:
        self._on_release = on_release
        self.__array_interface__ = array.__array_interface__
        self._array = array  # keeps the memory alive

    def __del__(self) -> None:
        self._on_release()


_HOST_ARRAYS = _RecycledArrays()


class _SharedMemory(shared_memory.SharedMemory):
    """A SharedMemory whose views may outlive it (the slot arrays, batches lent to tensors): closing it then
    fails with BufferError, which is expected; the pages go with the last view (its descriptor at exit)."""

    def __del__(self) -> None:
        with contextlib.suppress(BufferError, OSError):
            self.close()


class _Slots:
    """The batch slots: uint8 images [slot, B, H, W, 3] and int64 labels [slot, B] in one block of memory shared
    with the workers. Under fork an anonymous map that forked workers inherit; under spawn a named
    SharedMemory, and pickling a _Slots sends its name (a spawned worker attaches), never its contents."""

    def __init__(self, num_slots: int, batch_size: int, named: bool) -> None:
        self._layout = (num_slots, batch_size)
        size = num_slots * batch_size * (INPUT_SIZE * INPUT_SIZE * 3 + 8)
        self._shared = _SharedMemory(create=True, size=size) if named else None
        self._view(self._shared.buf if named else mmap.mmap(-1, size))
        self.images.fill(0)  # fault every page in now, not during the first batches

    def _view(self, memory: Any) -> None:
        num_slots, batch_size = self._layout
        image_bytes = num_slots * batch_size * INPUT_SIZE * INPUT_SIZE * 3
        self.images = np.frombuffer(memory, np.uint8, image_bytes).reshape(
            num_slots, batch_size, INPUT_SIZE, INPUT_SIZE, 3)
        self.labels = np.frombuffer(memory, np.int64, num_slots * batch_size, image_bytes).reshape(
            num_slots, batch_size)

    def __getstate__(self) -> dict:
        if self._shared is None:
            raise TypeError("anonymous slots are inherited by forked workers, not pickled")
        return {"name": self._shared.name, "layout": self._layout}

    def __setstate__(self, state: dict) -> None:
        self._layout = state["layout"]
        self._shared = _SharedMemory(name=state["name"])
        self._view(self._shared.buf)

    def release(self) -> None:
        """Remove the name of named memory (the pages go with the last mapping: lent batches keep theirs)."""
        if self._shared is not None:
            with contextlib.suppress(FileNotFoundError):
                self._shared.unlink()


class _WorkerPool:
    """Worker processes and the shared-memory slots they fill; see FaceDataLoader."""

    def __init__(self, dataset: FaceDataset, batch_size: int, num_workers: int, slots_per_worker: int,
                 timeout: float, start_method: str) -> None:
        self.num_workers, self.num_slots, self.timeout = num_workers, num_workers * slots_per_worker, timeout
        self.slots = slots = _Slots(self.num_slots, batch_size, named=start_method != "fork")
        self.images, self.labels = slots.images, slots.labels
        self.free = collections.deque(range(self.num_slots))  # slots neither in flight nor held by the loader
        self.generation, self.submitted, self.in_flight = 0, 0, 0
        context = multiprocessing.get_context(start_method)
        self._connections, self._processes = [], []
        self.close = weakref.finalize(self, _stop_workers, self._processes, self._connections, slots)
        for w in range(num_workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_loop, name=f"face-loader-{w}", daemon=True,
                                      args=(dataset, slots, theirs, os.getpid()))
            process.start()
            theirs.close()
            self._connections.append(ours)
            self._processes.append(process)

    def restart(self) -> int:
        """Wait out the batches still in flight from an earlier iteration; a new generation starts."""
        while self.in_flight:
            self.free.append(self.receive(raise_dataset_errors=False))
        self.generation += 1
        self.submitted = 0
        return self.generation

    def submit(self, batch: list[tuple[int, int]] | None) -> bool:
        """Send the next batch (or nothing at the end of the epoch) to its worker, into a free slot; True if sent."""
        if batch is None:
            return False
        k, worker = self.submitted, self.submitted % self.num_workers
        task = (self.free.popleft(), np.array([i for i, _ in batch], dtype=np.int64).tobytes(), batch[0][1])
        try:
            self._connections[worker].send(task)
        except OSError:
            raise self._dead(worker) from None
        self.submitted, self.in_flight = k + 1, self.in_flight + 1
        return True

    def receive(self, raise_dataset_errors: bool = True) -> int:
        """The slot of the oldest batch in flight, once its worker has filled it (the caller now holds it)."""
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
            self.free.append(slot)
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


def _worker_loop(dataset: FaceDataset, slots: _Slots, connection: Any, parent: int) -> None:
    """A worker: (slot, int64 indices as bytes, epoch) -> fill the slot -> (slot, None or the exception). Ends on
    None, on a closed pipe, or when the training process is gone."""
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
                dataset.load_batch(np.frombuffer(indices, np.int64), epoch, slots.images[slot], slots.labels[slot])
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


def _stop_workers(processes: list, connections: list, slots: _Slots) -> None:
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
    slots.release()


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
    "flip_mask",
    "image_folder_listing",
    "to_model_input",
]
