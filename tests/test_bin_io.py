"""eval/bin_io.py: every kind of real .bin loads to the same bytes; bad files fail clearly; nothing runs code.

The Python-2 and numpy-1 kinds cannot be written by this interpreter, so they are crafted:
- Python 2 (`cPickle.dump(obj, f, 2)` of str): written opcode by opcode below (PROTO 2, EMPTY_LIST, MARK,
  BINSTRING/SHORT_BINSTRING for each image, APPENDS, NEWTRUE/NEWFALSE, TUPLE2, STOP, with BINPUT memo ops as
  Python 2 writes them); `pickletools.dis` accepts it.
- numpy 1: a protocol-2 pickle of numpy-2 arrays names its globals as text lines (`GLOBAL 'module\\nname\\n'`,
  no length prefix), so replacing `numpy._core.` with `numpy.core.` yields exactly what numpy 1 writes. At
  protocols 4 and 5 the names are length-prefixed strings inside frames: `_numpy1_names` re-encodes each string
  that names `numpy._core...` and re-frames the pickle (pickletools.optimize), which is again what numpy 1
  writes for the same arrays (numpy 1 reduces arrays exactly as numpy 2 does, under the old module name).
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import warnings

import cv2
import numpy as np
import pytest

from eval.bin_io import BinSet, load_bin, parse_bin, read_bin, write_bin
from utils.image import decode_rgb
from utils.safe_pickle import UnsafePickleError

ISSAME = [True, False, True]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(2 * len(ISSAME)):
        img = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 2)
        ok, buf = cv2.imencode(".png" if i % 2 else ".jpg", img)
        assert ok
        out.append(buf.tobytes())
    return out


def _py2_str_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    out, memo = bytearray(b"\x80\x02]q\x00("), 1
    for b in bins:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
        out += b"q" + bytes([memo])
        memo += 1
    out += b"e]q" + bytes([memo]) + b"(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e\x86q"
    out += bytes([memo + 1]) + b"."
    return bytes(out)


class _Numpy1FromBuffer:
    """Pickles like numpy 1.x's protocol-5 array reduction (`numpy.core.numeric._frombuffer`), at protocol 2."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        return np._core.numeric._frombuffer, (self.data, np.dtype(np.uint8), (len(self.data),), "C")


def _kinds(bins: list[bytes]) -> dict[str, bytes]:
    arrays = [np.frombuffer(b, np.uint8) for b in bins]
    numpy1_reconstruct = pickle.dumps((arrays, ISSAME), protocol=2)
    numpy1_frombuffer = pickle.dumps(([_Numpy1FromBuffer(b) for b in bins], ISSAME), protocol=2)
    return {
        "python3_bytes": pickle.dumps((bins, ISSAME), protocol=4),
        "python2_str": _py2_str_pickle(bins, ISSAME),
        "numpy2_reconstruct": pickle.dumps((arrays, ISSAME), protocol=4),
        "numpy2_frombuffer": pickle.dumps((arrays, ISSAME), protocol=5),
        "numpy1_reconstruct": numpy1_reconstruct.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"),
        "numpy1_frombuffer": numpy1_frombuffer.replace(b"numpy._core.numeric\n", b"numpy.core.numeric\n"),
    }


def _numpy1_names(data: bytes) -> bytes:
    """A protocol 4/5 pickle written by numpy 2, as numpy 1 writes it: `numpy.core.*` instead of `numpy._core.*`."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for (op, arg, pos), (_, _, end) in zip(ops, [*ops[1:], (None, None, len(data))], strict=True):
        if op.name == "FRAME":
            continue  # re-framed below
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and arg.startswith("numpy._core"):
            name = arg.replace("numpy._core", "numpy.core", 1).encode()
            short = op.name == "SHORT_BINUNICODE"
            out += (b"\x8c" + bytes([len(name)]) if short else b"X" + struct.pack("<I", len(name))) + name
        else:
            out += data[pos:end]
    return pickletools.optimize(bytes(out))


def _column_kinds(bins: list[bytes]) -> dict[str, bytes]:
    """(n, 1) uint8 arrays, as cv2.imencode returns them and InsightFace's small_lfw.bin stores them."""
    columns = [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in bins]
    protocol2 = pickle.dumps((columns, ISSAME), protocol=2)
    return {
        "numpy2_reconstruct": pickle.dumps((columns, ISSAME), protocol=4),
        "numpy2_frombuffer": pickle.dumps((columns, ISSAME), protocol=5),
        "numpy1_reconstruct_protocol2": protocol2.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"),
        "numpy1_reconstruct_protocol4": _numpy1_names(pickle.dumps((columns, ISSAME), protocol=4)),
        "numpy1_frombuffer_protocol5": _numpy1_names(pickle.dumps((columns, ISSAME), protocol=5)),
    }


@pytest.mark.parametrize("kind", ["numpy2_reconstruct", "numpy2_frombuffer", "numpy1_reconstruct_protocol2",
                                  "numpy1_reconstruct_protocol4", "numpy1_frombuffer_protocol5"])
def test_column_arrays_of_encoded_bytes_read_like_bytes(kind, images, tmp_path):
    """Was: `image 0 is a ndarray uint8 (4996, 1); expected encoded image bytes or a 1-D uint8 array`."""
    data = _column_kinds(images)[kind]
    pickletools.dis(data, out=open(tmp_path / "dis.txt", "w"))  # noqa: SIM115 -- a well-formed pickle
    if kind.startswith("numpy1"):
        assert b"numpy._core" not in data and b"numpy.core." in data
    with warnings.catch_warnings():  # numpy 2 still reads numpy 1's names (with a DeprecationWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        columns, _ = pickle.loads(data)  # the real unpickler: the file is what numpy writes
    assert [c.shape for c in columns] == [(len(b), 1) for b in images]
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(data)
    bins, issame = read_bin(path)
    assert bins == images and issame.tolist() == ISSAME
    np.testing.assert_array_equal(load_bin(path, progress=False).images[0], decode_rgb(images[0]))


_EXPECTED_GLOBAL = {"python3_bytes": None, "python2_str": None,
                    "numpy2_reconstruct": b"numpy._core.multiarray", "numpy2_frombuffer": b"numpy._core.numeric",
                    "numpy1_reconstruct": b"numpy.core.multiarray\n_reconstruct",
                    "numpy1_frombuffer": b"numpy.core.numeric\n_frombuffer"}


@pytest.mark.parametrize("kind", list(_EXPECTED_GLOBAL))
def test_every_kind_reads_to_the_same_bytes(kind, images, tmp_path):
    data = _kinds(images)[kind]
    with open(tmp_path / "dis.txt", "w") as f:
        pickletools.dis(data, out=f)  # a well-formed pickle, not just bytes we made up
    if _EXPECTED_GLOBAL[kind]:
        assert _EXPECTED_GLOBAL[kind] in data
    else:
        assert b"numpy" not in data
    if kind == "python2_str":
        assert b"U" in data or b"T" in data
        with pytest.raises(UnicodeDecodeError):  # what a naive pickle.loads does with Python-2 JPEG strings
            pickle.loads(data)
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(data)
    bins, issame = read_bin(path)
    assert bins == images and all(type(b) is bytes for b in bins)
    assert issame.dtype == np.bool_ and issame.tolist() == ISSAME


def test_load_bin_decodes_rgb_and_names_the_set(images, tmp_path):
    path = tmp_path / "lfw.bin"
    write_bin(path, images, ISSAME)
    bs = load_bin(path, progress=False)
    assert isinstance(bs, BinSet) and bs.name == "lfw" and bs.num_pairs == 3
    assert bs.images.shape == (6, 112, 112, 3) and bs.images.dtype == np.uint8
    for img, buf in zip(bs.images, images, strict=True):
        np.testing.assert_array_equal(img, decode_rgb(buf))
    assert bs.checksum == hashlib.sha1(path.read_bytes()).hexdigest()[:8]
    assert bs.issame.tolist() == ISSAME


def test_load_bin_resizes_other_sizes_with_a_warning(images, tmp_path):
    big = cv2.imencode(".png", np.full((160, 150, 3), 77, np.uint8))[1].tobytes()
    path = tmp_path / "x.bin"
    write_bin(path, [big, *images[1:]], ISSAME)
    with pytest.warns(UserWarning, match=r"resized 1 of 6 images to 112x112"):
        bs = load_bin(path, progress=False)
    assert bs.images.shape == (6, 112, 112, 3) and (bs.images[0] == 77).all()


def test_write_bin_is_a_python3_bytes_pickle_and_atomic(images, tmp_path):
    path = tmp_path / "a.bin"
    write_bin(path, images, ISSAME)
    assert pickle.loads(path.read_bytes()) == (images, ISSAME)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="2 images per pair"):
        write_bin(path, images[:-1], ISSAME)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("obj, message", [
    (lambda b: (b[:-1], ISSAME), r"5 images is an odd number"),
    (lambda b: (b, ISSAME[:2]), r"6 images but 2 issame labels"),
    (lambda b: ([], []), r"no pairs"),
    (lambda b: ([*b[:-1], 7], ISSAME), r"image 5 is a int"),
    (lambda b: ([*b[:-1], np.zeros((2, 2), np.uint8)], ISSAME), r"image 5 is a ndarray uint8 \(2, 2\)"),
    (lambda b: ([*b[:-1], np.zeros((112, 112, 3), np.uint8)], ISSAME), r"image 5 is a ndarray uint8 \(112, 112, 3\)"),
    (lambda b: ([*b[:-1], np.zeros((9, 1), np.int16)], ISSAME), r"image 5 is a ndarray int16 \(9, 1\)"),
    (lambda b: (b, [True, "yes", False]), r"issame\[1\] = 'yes' is not a bool"),
    (lambda b: {"bins": b}, r"expected a pickle of \(bins, issame_list\), found dict"),
    (lambda b: (b, ISSAME, 1), r"found tuple of length 3"),
    (lambda b: (b"".join(b), ISSAME), r"bins is a bytes"),
])
def test_bad_contents_raise_naming_the_file(obj, message, images, tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj(images), protocol=4))
    with pytest.raises(ValueError, match=message) as info:
        read_bin(path)
    assert str(path) in str(info.value)


def test_truncated_file(images, tmp_path):
    data = pickle.dumps((images, ISSAME), protocol=4)
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.bin: not a readable .bin pickle, truncated or corrupt"):
        read_bin(path)


def test_undecodable_image_names_its_index(images, tmp_path):
    path = tmp_path / "broken.bin"
    write_bin(path, [*images[:3], b"\xff\xd8 not a jpeg", *images[4:]], ISSAME)
    with pytest.raises(ValueError, match=r"broken.bin: image 3 \(pair 1\) cannot be decoded"):
        load_bin(path, progress=False)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_code_running_pickle_raises_and_runs_nothing(images, tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps((images, [_Payload(str(marker)), *ISSAME[1:]]), protocol=2)
    # control: the payload is real -- an ordinary unpickler runs it (in a child process)
    control = tmp_path / "control"
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=pickle.dumps(_Payload(str(control))), check=True)
    assert control.exists()
    path = tmp_path / "evil.bin"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"evil.bin: refusing to load global (__builtin__|builtins).exec"):
        read_bin(path)
    with pytest.raises(UnsafePickleError):
        load_bin(path, progress=False)
    assert not marker.exists()


def test_parse_bin_accepts_numpy_bool_issame(images):
    bins, issame = parse_bin(pickle.dumps((images, np.array(ISSAME)), protocol=4))
    assert bins == images
    assert issame.tolist() == ISSAME


def _peak_bytes(read) -> int:
    """Peak bytes traced (NumPy and the unpickler report theirs) while `read()` runs; its exception is kept."""
    tracemalloc.start()
    try:
        with contextlib.suppress(ValueError):
            read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("data, message", [
    # numpy's _reconstruct(ndarray, (0,), b'b') asked for 256 MB: (2**28,)
    (lambda p: p.replace(b"K\x00\x85", b"J\x00\x00\x00\x10\x85", 1), r"shape \(268435456,\) .* larger than the file"),
    # numpy.ndarray called with a shape of its own
    (lambda p: b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x10\x85R.", r"TypeError: 'object' object is not callable"),
    # a memo index of 2**24: the C unpickler sizes its memo table by it (256 MB)
    (lambda p: b"\x80\x02]r\x00\x00\x00\x01.", r"memo index 16777216 is beyond the file"),
], ids=["reconstruct-shape", "ndarray-call", "memo-index"])
def test_nothing_is_sized_by_what_a_bin_claims(images, tmp_path, data, message):
    """Was: each of these allocated 256 MB (a larger claim, more) before failing or loading."""
    path = tmp_path / "claims.bin"
    path.write_bytes(data(pickle.dumps(([np.frombuffer(b, np.uint8) for b in images], ISSAME), protocol=2)))
    assert _peak_bytes(lambda: read_bin(path)) < 16 << 20
    with pytest.raises(ValueError, match=message) as info:
        read_bin(path)
    assert str(path) in str(info.value)


def jpeg_claiming(size: int, image: bytes) -> bytes:
    """A JPEG whose frame header claims size x size pixels (the scan data is the 112x112 one's)."""
    sof = image.index(b"\xff\xc0")
    return image[:sof + 5] + struct.pack(">HH", size, size) + image[sof + 9:]


def test_an_image_header_claiming_too_many_pixels_is_refused_before_decoding(images, tmp_path):
    """Was: decoded at the claimed size (8000x8000: 192 MB) and then refused or resized."""
    bins = [*images[:-1], jpeg_claiming(8000, images[0])]
    path = tmp_path / "big.bin"
    write_bin(path, bins, ISSAME)
    with pytest.raises(ValueError, match=r"big\.bin: image 5 \(pair 2\) claims 64000000 pixels in its header"):
        load_bin(path, progress=False)
