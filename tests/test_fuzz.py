"""Property tests: damaged data files read as valid samples or fail with the project's own error naming the file.

Each example damages one valid file -- cuts it short, flips bits (often in the headers of records and images), or
copies a stretch of it over another place -- and reads it as training (lenient and strict), the data tools and
evaluation do. Every read must give valid samples (uint8 112x112x3 images, labels in [0, num_classes)) or raise a
ValueError (RecordIOError, UnsafePickleError) or OSError whose message names the file (and the key, for a
record); lenient warnings name the file too. Never another exception type (struct.error, UnicodeDecodeError,
IndexError, MemoryError...), never a hang (an alarm per example), never a large allocation sized by the damage
(tracemalloc's peak, which sees NumPy's and the unpickler's allocations, stays under ALLOCATION_LIMIT).

Bounded for CI: derandomized (the same examples every run), FUZZ_EXAMPLES examples per property (default 25, a
few seconds in all). A longer run: `FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py` (bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import signal
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataset as D
from eval.bin_io import load_bin
from mxnet_reader.recordio import MXIndexedRecordIO
from tools import check_dataset
from utils.image import INPUT_SIZE

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
ALLOCATION_LIMIT = 64 << 20  # bytes: the files are a few kB; a legitimate read peaks at a few MB
ALARM_SECONDS = 20  # per example: far above any legitimate read of these files (milliseconds)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- damage --------------------------------------------------------------------------------------------------
def damages(size: int, hot_spots: list[int]):
    """A damage of a file of `size` bytes: ("cut", n), ("flip", [(byte, bit), ...]) or ("splice", src, n, dst).
    Positions are uniform or within 256 bytes after a hot spot (record and image headers live there)."""
    anywhere = st.integers(0, size - 1)
    near = st.sampled_from(hot_spots).flatmap(lambda o: st.integers(o, min(o + 255, size - 1)))
    position = st.one_of(anywhere, near) if hot_spots else anywhere
    return st.one_of(
        st.tuples(st.just("cut"), position),
        st.tuples(st.just("flip"), st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=6)),
        st.tuples(st.just("splice"), position, st.integers(1, 64), position))


def damaged(data: bytes, damage: tuple) -> bytes:
    out = bytearray(data)
    if damage[0] == "cut":
        return bytes(out[:damage[1]])
    if damage[0] == "flip":
        for byte, bit in damage[1]:
            out[byte] ^= 1 << bit
        return bytes(out)
    _, src, length, dst = damage
    out[dst:dst + length] = data[src:src + length]
    return bytes(out)


@contextlib.contextmanager
def bounded(name: str):
    """Fails the example on a hang (SIGALRM) or on an allocation peak above ALLOCATION_LIMIT."""
    def on_alarm(*_):
        raise TimeoutError(f"{name}: no answer in {ALARM_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(ALARM_SECONDS)
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < ALLOCATION_LIMIT, f"{name}: {peak / 2**20:.0f} MB allocated reading damaged files"


def assert_own_error(err: BaseException, names: str, key: bool = False) -> None:
    """The project's own error: a ValueError (not a codec error) or OSError whose message names the file."""
    assert isinstance(err, (ValueError, OSError)) and not isinstance(err, UnicodeError), repr(err)
    assert names in str(err), f"{err!r} does not name {names}"
    if key:
        assert "key" in str(err), repr(err)


def assert_valid_batch(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    assert images.dtype == np.uint8 and images.shape[1:] == (INPUT_SIZE, INPUT_SIZE, 3)
    assert ((labels >= 0) & (labels < num_classes)).all()


def read_like_training(ds: D.FaceDataset) -> None:
    """Every sample one by one and then all at once, as loader workers do."""
    images, labels = np.empty((len(ds), INPUT_SIZE, INPUT_SIZE, 3), np.uint8), np.empty(len(ds), np.int64)
    for i in range(len(ds)):
        ds.load_batch(np.array([i]), 0, images[i:i + 1], labels[i:i + 1])
    ds.load_batch(np.arange(len(ds)), 1, images, labels)
    assert_valid_batch(images, labels, ds.num_classes)


def read_dataset(cls, root: Path, key: bool) -> None:
    """Open and read `root` leniently (warnings must name it) and strictly; each may refuse in one error, which
    names the key too if it comes from reading a record."""
    for strict in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = cls(root, train=True, strict=strict)
            except Exception as err:  # the property is about which exceptions come out
                assert_own_error(err, str(root))
                continue
            try:
                read_like_training(ds)
            except Exception as err:
                assert_own_error(err, str(root), key=key)
        for warning in caught:
            assert str(root) in str(warning.message), str(warning.message)


# -- the valid files ----------------------------------------------------------------------------------------
def face(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), (INPUT_SIZE, INPUT_SIZE))


def encoded(seed: int, ext: str = ".jpg") -> bytes:
    return cv2.imencode(ext, face(seed), [cv2.IMWRITE_JPEG_QUALITY, 40] if ext == ".jpg" else [])[1].tobytes()


@functools.cache
def rec_set() -> dict[str, bytes]:
    """An InsightFace set of 6 images of 3 identities (header record, identity records, property)."""
    from mxnet_reader.insightface import write_insightface_rec

    with tempfile.TemporaryDirectory() as tmp:
        write_insightface_rec(tmp, [(k // 2, encoded(k)) for k in range(6)], progress=False)
        return {name: (Path(tmp) / name).read_bytes() for name in ("train.rec", "train.idx", "property")}


@functools.cache
def folder_set() -> dict[str, bytes]:
    """An image folder with label.txt: 2 JPEGs and a PNG of 2 identities."""
    return {"label.txt": b"images/a.jpg\t0\nimages/b.png 1\nimages/c.jpg\t1\n", "images/a.jpg": encoded(1),
            "images/b.png": encoded(2, ".png"), "images/c.jpg": encoded(3)}


@functools.cache
def bin_kinds() -> dict[str, bytes]:
    """A .bin of 2 pairs pickled as bytes and as (n, 1) uint8 arrays at protocols 2, 4 and 5."""
    images, issame = [encoded(k, ".png" if k == 1 else ".jpg") for k in range(4)], [True, False]
    arrays = [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in images]
    kinds = {"bytes": pickle.dumps((images, issame), protocol=4)}
    kinds.update({f"arrays_protocol{p}": pickle.dumps((arrays, issame), protocol=p) for p in (2, 4, 5)})
    return kinds


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def record_starts() -> list[int]:
    return [int(line.split(b"\t")[1]) for line in rec_set()["train.idx"].splitlines()]


# -- properties ---------------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_damaged_recordio_sets(data):
    name = data.draw(st.sampled_from(["train.rec", "train.rec", "train.idx", "property"]), label="file")
    hot = record_starts() if name == "train.rec" else []
    check_recordio(name, data.draw(damages(len(rec_set()[name]), hot), label="damage"))


def check_recordio(name: str, damage: tuple) -> None:
    files = rec_set()
    with tempfile.TemporaryDirectory() as tmp, bounded(name):
        root = write_files(Path(tmp) / "set", {**files, name: damaged(files[name], damage)})
        read_dataset(D.RecordIODataset, root, key=True)
        try:
            reader = MXIndexedRecordIO(root / "train.idx", root / "train.rec", "r")
            reader.read_images(reader.key_array)
        except Exception as err:
            assert_own_error(err, str(root), key=True)
        report = check_dataset.check(root, progress=False)  # the tool reports problems, it never raises
        assert all(str(root) in p or not p.startswith("cannot open") for p in report["problems"])


@FUZZ
@given(data=st.data())
def test_damaged_image_folders(data):
    name = data.draw(st.sampled_from(sorted(folder_set())), label="file")
    hot = [0] if name != "label.txt" else []
    check_folder(name, data.draw(damages(len(folder_set()[name]), hot), label="damage"))


def check_folder(name: str, damage: tuple) -> None:
    files = folder_set()
    with tempfile.TemporaryDirectory() as tmp, bounded(name):
        root = write_files(Path(tmp) / "folder", {**files, name: damaged(files[name], damage)})
        read_dataset(D.ImageFolderDataset, root, key=False)


@FUZZ
@given(data=st.data())
def test_damaged_bin_sets(data):
    kind = data.draw(st.sampled_from(sorted(bin_kinds())), label="kind")
    check_bin(kind, data.draw(damages(len(bin_kinds()[kind]), [0]), label="damage"))


def check_bin(kind: str, damage: tuple) -> None:
    kinds = bin_kinds()
    with tempfile.TemporaryDirectory() as tmp, bounded(kind):
        path = Path(tmp) / "set.bin"
        path.write_bytes(damaged(kinds[kind], damage))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                bins = load_bin(path, progress=False)
            except Exception as err:
                assert_own_error(err, str(path))
                bins = None
        assert all(str(path) in str(w.message) for w in caught), [str(w.message) for w in caught]
        if bins is not None:
            assert bins.images.dtype == np.uint8 and bins.images.shape == (2 * bins.num_pairs, 112, 112, 3)
            assert bins.issame.dtype == np.bool_


# -- what the long runs found (each failed before its fix) --------------------------------------------------
@pytest.mark.parametrize("check, name, damage", [
    (check_recordio, "train.rec", ("flip", [(8, 0)])),  # IRHeader flag 1: label = JPEG bytes as a float, 1e30
    (check_folder, "images/a.jpg", ("splice", 31, 1, 169)),  # the new header check: simplejpeg's KeyError: 6
    (check_folder, "label.txt", ("splice", 36, 31, 0)),  # an absolute path '/c.jpg': the error named no folder
    (check_bin, "arrays_protocol2", ("flip", [(7, 0)])),  # numpy -> oumpy: UnsafePickleError was no ValueError
], ids=["label-1e30", "jpeg-header-keyerror", "absolute-path", "renamed-global"])
def test_found_by_fuzzing(check, name, damage):
    check(name, damage)
