"""mxnet_reader.recordio against files written by real mxnet 1.9.1, hand-built dmlc byte layouts, and bad input."""

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import struct

import cv2
import numpy as np
import pytest

from mxnet_reader import recordio
from mxnet_reader.recordio import IRHeader, MXIndexedRecordIO, MXRecordIO, RecordIOError
from utils.image import decode_rgb

MAGIC = struct.pack("<I", 0xCED7230A)


def md5(data) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def mxnet_dir(shared_fixtures):
    return shared_fixtures / "mxnet_written"


@pytest.fixture(scope="module")
def expected(mxnet_dir):
    return json.loads((mxnet_dir / "expected.json").read_text())


def open_fixture(directory) -> MXIndexedRecordIO:
    return MXIndexedRecordIO(directory / "train.idx", directory / "train.rec", "r")


# -- the mxnet-written fixture ----------------------------------------------------------------------------
def test_reads_every_record_of_the_mxnet_fixture(mxnet_dir, expected):
    reader = open_fixture(mxnet_dir)
    assert [[k, reader.offset_of(k)] for k in reader.keys] == expected["idx_entries_in_file_order"]
    assert reader.keys == expected["physical_key_order"]
    assert 73 not in reader and -1 not in reader and 72 in reader  # dense keys 0..72: direct lookup
    for key, rec in expected["records"].items():
        raw = reader.read_idx(int(key))
        assert (len(raw), md5(raw)) == (rec["record_len"], rec["record_md5"])
        header, payload = recordio.unpack(raw)
        want = rec["header"]
        assert (header.flag, header.id, header.id2) == (want["flag"], want["id"], want["id2"])
        np.testing.assert_array_equal(np.float32(header.label), np.float32(want["label"]))
        assert len(payload) == rec["payload_len"]
        if payload:
            assert md5(payload) == rec["payload_md5"]
            _, bgr = recordio.unpack_img(raw, 1)  # mxnet semantics: cv2.imdecode, BGR
            assert md5(bgr.tobytes()) == rec["cv2_imdecode_bgr"]["md5"]
            assert md5(decode_rgb(payload).tobytes()) == rec["mx_image_imdecode_rgb"]["md5"]


def test_sequential_read_follows_physical_order(mxnet_dir, expected):
    reader = MXRecordIO(mxnet_dir / "train.rec", "r")
    offsets = []
    while True:
        offsets.append(reader.tell())
        raw = reader.read()
        if raw is None:
            break
        assert recordio.unpack(raw)[0].id == expected["physical_key_order"][len(offsets) - 1]
    assert offsets[:-1] == [off for _, off in expected["idx_entries_in_file_order"]]
    assert offsets[-1] == expected["files"]["train.rec"]["bytes"]
    reader.reset()
    assert recordio.unpack(reader.read())[0].id == 1


def test_writer_reproduces_the_mxnet_files_byte_for_byte(mxnet_dir, tmp_path):
    reader = open_fixture(mxnet_dir)
    writer = MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "w")
    for key in reader.keys:
        writer.write_idx(key, reader.read_idx(key))
    assert not (tmp_path / "train.rec").exists()  # still a temporary file until close()
    writer.close()
    for name in ("train.rec", "train.idx"):
        assert (tmp_path / name).read_bytes() == (mxnet_dir / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.idx", "train.rec"]  # no temporary left behind


# -- split records and labels -------------------------------------------------------------------------------
def frame(cflag: int, body: bytes) -> bytes:
    """dmlc layout of one part, written out by hand: magic, (cflag << 29 | length), body, zero padding."""
    return MAGIC + struct.pack("<I", cflag << 29 | len(body)) + body + b"\0" * (-len(body) % 4)


@pytest.mark.parametrize(
    ("payload", "layout"),
    [
        (b"abcdefg", frame(0, b"abcdefg")),
        (b"AAAA" + MAGIC + b"BBBBBB", frame(1, b"AAAA") + frame(3, b"BBBBBB")),
        (MAGIC + b"xy", frame(1, b"") + frame(3, b"xy")),  # magic first: an empty first part
        (b"AAAA" + MAGIC, frame(1, b"AAAA") + frame(3, b"")),  # magic last: an empty last part
        (b"AAAA" + MAGIC + MAGIC + b"CCCCCCCC" + MAGIC + b"D",
         frame(1, b"AAAA") + frame(2, b"") + frame(2, b"CCCCCCCC") + frame(3, b"D")),
        (b"A" + MAGIC + b"BBB", frame(0, b"A" + MAGIC + b"BBB")),  # unaligned magic: not split
        (b"AAAAB" + MAGIC[:3], frame(0, b"AAAAB" + MAGIC[:3])),
    ],
    ids=["plain", "split", "magic-first", "magic-last", "three-parts", "unaligned", "partial-magic"],
)
def test_split_records_match_dmlc_layout_and_round_trip(tmp_path, payload, layout):
    assert recordio.encode_record(payload) == layout
    with MXIndexedRecordIO(tmp_path / "x.idx", tmp_path / "x.rec", "w") as writer:
        writer.write_idx(7, payload)
        writer.write_idx(8, b"next")
    assert (tmp_path / "x.rec").read_bytes() == layout + frame(0, b"next")
    reader = MXIndexedRecordIO(tmp_path / "x.idx", tmp_path / "x.rec", "r")
    assert reader.read_idx(7) == payload
    assert reader.read_idx(8) == b"next"


def test_jpeg_with_magic_inside_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    jpeg = bytearray(cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes())
    jpeg[400:404] = MAGIC  # an aligned magic inside the (header-prefixed) payload: 24 + 400 is a multiple of 4
    record = recordio.pack(IRHeader(0, 3.0, 5, 0), bytes(jpeg))
    assert record.find(MAGIC) % 4 == 0
    with MXRecordIO(tmp_path / "s.rec", "w") as writer:
        writer.write(record)
    raw = (tmp_path / "s.rec").read_bytes()
    assert raw.count(MAGIC) == 2  # the split: a second frame instead of the payload's magic
    assert MXRecordIO(tmp_path / "s.rec", "r").read() == record


def test_pack_unpack_like_mxnet():
    header, payload = recordio.unpack(recordio.pack(IRHeader(0, 3.0, 11, 2), b"img"))
    assert header == IRHeader(0, 3.0, 11, 2) and payload == b"img"
    raw = recordio.pack(IRHeader(99, [1.5, 2.0, -3.25], 4, 0), b"img")  # flag is derived from the label
    assert raw[:4] == struct.pack("<I", 3) and len(raw) == 24 + 12 + 3
    header, payload = recordio.unpack(raw)
    assert header.flag == 3 and payload == b"img"
    np.testing.assert_array_equal(header.label, np.float32([1.5, 2.0, -3.25]))
    assert recordio.unpack(recordio.pack(IRHeader(5, 7, 0, 0), b""))[0].flag == 0  # a scalar label forces flag 0


def test_pack_img_unpack_img_round_trip():
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    _, img = recordio.unpack_img(recordio.pack_img(IRHeader(0, 1.0, 0, 0), bgr, quality=3, img_fmt=".png"))
    np.testing.assert_array_equal(img, bgr)  # PNG is lossless; unpack_img returns BGR like mxnet
    _, gray = recordio.unpack_img(recordio.pack_img((0, 1.0, 0, 0), bgr, quality=1, img_fmt=".png"), iscolor=0)
    assert np.abs(gray.astype(int) - cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)).max() <= 1  # decoder rounding
    raw = recordio.pack_img((0, 1.0, 0, 0), bgr, quality=80)
    jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    assert raw == recordio.pack((0, 1.0, 0, 0), jpeg)  # mxnet stores cv2.imencode's bytes after the header
    np.testing.assert_array_equal(recordio.unpack_img(raw)[1], cv2.imdecode(np.frombuffer(jpeg, np.uint8), -1))


# -- processes ----------------------------------------------------------------------------------------------
def _child_read(reader, keys, queue):
    queue.put([md5(reader.read_idx(k)) for k in keys])


def test_reader_is_fork_and_pickle_safe(mxnet_dir):
    reader = open_fixture(mxnet_dir)
    keys = reader.keys[::7]
    want = [md5(reader.read_idx(k)) for k in keys]  # the parent has an open handle before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_read, args=(reader, keys, queue))
    child.start()
    got = queue.get(timeout=30)
    child.join(30)
    assert got == want
    assert [md5(reader.read_idx(k)) for k in keys] == want  # the parent's handle is unaffected
    clone = pickle.loads(pickle.dumps(reader))  # what spawn does
    assert clone._map is None and [md5(clone.read_idx(k)) for k in keys] == want


def test_read_idx_view_is_the_record_without_a_copy(mxnet_dir, tmp_path):
    reader = open_fixture(mxnet_dir)
    views = [reader.read_idx_view(k) for k in range(73)]
    assert all(v.readonly and bytes(v) == reader.read_idx(k) for k, v in enumerate(views))
    mapped = np.frombuffer(reader._mapped(), np.uint8)
    assert np.shares_memory(np.frombuffer(views[5], np.uint8), mapped)  # a slice of the map, not a copy
    reader.close()  # views still in use keep the map alive: no error, and they stay readable
    assert bytes(views[5]) == open_fixture(mxnet_dir).read_idx(5)
    with pytest.raises(ValueError, match="closed"):
        reader.read_idx_view(5)
    split = b"ab" + recordio.MAGIC_BYTES + b"cd"  # a split record comes back joined, magic restored
    with MXIndexedRecordIO(tmp_path / "s.idx", tmp_path / "s.rec", "w") as writer:
        writer.write_idx(0, split)
    assert bytes(MXIndexedRecordIO(tmp_path / "s.idx", tmp_path / "s.rec", "r").read_idx_view(0)) == split


@pytest.mark.parametrize("keys", [[5, 6, 7, 8, 9, 10], [5, 60, 7, 800, 9, 10000]], ids=["dense", "sparse"])
def test_read_images_equals_unpack_of_read_idx(tmp_path, keys):
    records = [
        recordio.pack((0, 3.0, 1, 0), b"jpeg bytes"),
        recordio.pack((0, [2.0, 7.5], 2, 0), b"two-float label"),
        recordio.pack((0, [11.0, 12.0], 0, 0), b""),  # an identity record: label range, no payload
        recordio.pack((0, 4.0, 4, 0), b"xxxx" + recordio.MAGIC_BYTES + b"yy"),  # split: aligned magic
        recordio.pack((0, 1.0, 5, 0), bytes(range(256)) * 40),
        recordio.pack((0, 9.0, 6, 0), b""),  # the last and shortest record: gathers past the file's end
    ]
    with MXIndexedRecordIO(tmp_path / "r.idx", tmp_path / "r.rec", "w") as writer:
        for key, record in zip(keys, records, strict=True):
            writer.write_idx(key, record)
    reader = MXIndexedRecordIO(tmp_path / "r.idx", tmp_path / "r.rec", "r")
    order = np.array(keys)[[4, 0, 3, 1, 5, 2, 0]]
    labels, payloads = reader.read_images(order)
    for key, label, payload in zip(order.tolist(), labels.tolist(), payloads, strict=True):
        header, want = recordio.unpack(reader.read_idx(key))
        assert label == (header.label if header.flag == 0 else header.label[0]) and bytes(payload) == want
    with pytest.raises(KeyError, match="key 4 not in"):
        reader.read_images(np.array([keys[0], 4]))


def test_read_images_reports_a_misframed_record_with_its_key(copy_dir, monkeypatch):
    monkeypatch.setattr("mxnet_reader.reader._OPEN_CHECK_SAMPLES", 1)
    edit_idx(copy_dir, 30, 6600)
    with pytest.raises(RecordIOError, match=r"key 30 at offset 6600: not a record boundary"):
        open_fixture(copy_dir).read_images(np.array([29, 30, 31]))


def test_writer_is_atomic_and_not_picklable(tmp_path):
    (tmp_path / "a.rec").write_bytes(b"old")
    with pytest.raises(RuntimeError), MXRecordIO(tmp_path / "a.rec", "w") as writer:
        writer.write(b"partial")
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(writer)
        raise RuntimeError("conversion failed")
    assert (tmp_path / "a.rec").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rec"]


# -- index variants -----------------------------------------------------------------------------------------
def test_sparse_duplicate_and_string_keys(tmp_path):
    with MXIndexedRecordIO(tmp_path / "k.idx", tmp_path / "k.rec", "w") as writer:
        for key, data in [(1000, b"a"), (-5, b"b"), (7, b"c"), (1000, b"d")]:
            writer.write_idx(key, data)
    reader = MXIndexedRecordIO(tmp_path / "k.idx", tmp_path / "k.rec", "r")
    assert reader.keys == [1000, -5, 7, 1000]
    assert reader.read_idx(1000) == b"d"  # the last line wins, like mxnet's dict
    assert reader.read_idx(-5) == b"b" and 8 not in reader and 7 in reader
    with pytest.raises(KeyError, match="key 8"):
        reader.read_idx(8)
    strings = MXIndexedRecordIO(tmp_path / "k.idx", tmp_path / "k.rec", "r", key_type=str)
    assert strings.keys == ["1000", "-5", "7", "1000"] and strings.read_idx("7") == b"c"
    reader.seek(7)
    assert reader.read() == b"c" and reader.read() == b"d" and reader.read() is None


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.fixture
def copy_dir(mxnet_dir, tmp_path):
    for name in ("train.rec", "train.idx"):
        shutil.copy(mxnet_dir / name, tmp_path / name)
        os.chmod(tmp_path / name, 0o644)
    return tmp_path


def edit_idx(directory, key, offset):
    lines = (directory / "train.idx").read_text().splitlines()
    lines = [f"{key}\t{offset}" if line.split("\t")[0] == str(key) else line for line in lines]
    (directory / "train.idx").write_text("\n".join(lines) + "\n")


def test_truncated_rec_is_reported_at_open(copy_dir):
    data = (copy_dir / "train.rec").read_bytes()
    (copy_dir / "train.rec").write_bytes(data[:-10])  # the last record (key 72) loses its tail
    with pytest.raises(RecordIOError, match=r"train\.rec key 72 at offset 425056: truncated"):
        open_fixture(copy_dir)
    (copy_dir / "train.rec").write_bytes(data[:200_000])  # cut in the middle: later offsets point past the end
    with pytest.raises(RecordIOError, match=r"train\.idx: key \d+ has offset \d+ in .*past the end"):
        open_fixture(copy_dir)


def test_truncated_rec_is_reported_by_sequential_read(copy_dir):
    data = (copy_dir / "train.rec").read_bytes()
    (copy_dir / "train.rec").write_bytes(data[:6000])  # inside the first record
    with pytest.raises(RecordIOError, match="at offset 0: truncated file"):
        MXRecordIO(copy_dir / "train.rec", "r").read()


@pytest.mark.parametrize(
    ("offset", "message"),
    [(10**9, "past the end"), (6582, "not 4-byte aligned"), (6600, "not a record boundary")],
)
def test_bad_idx_offset_is_reported_at_open_with_key(copy_dir, offset, message):
    edit_idx(copy_dir, 9, offset)
    with pytest.raises(RecordIOError, match=f"key 9.*{message}|{message}.*key 9"):
        open_fixture(copy_dir)


def test_bad_offset_outside_the_open_sample_is_caught_on_read(copy_dir, monkeypatch):
    monkeypatch.setattr("mxnet_reader.reader._OPEN_CHECK_SAMPLES", 1)  # as for a 42M-key index: only a sample at open
    edit_idx(copy_dir, 30, 6600)
    reader = open_fixture(copy_dir)
    with pytest.raises(RecordIOError, match=r"key 30 at offset 6600: not a record boundary"):
        reader.read_idx(30)


def test_malformed_idx_line_and_missing_files(copy_dir):
    with open(copy_dir / "train.idx", "a") as f:
        f.write("73\tnot-a-number\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: line 74"):
        open_fixture(copy_dir)
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        MXIndexedRecordIO(copy_dir / "nope.idx", copy_dir / "train.rec", "r")
    with pytest.raises(FileNotFoundError, match=r"nope\.rec"):
        MXRecordIO(copy_dir / "nope.rec", "r")
    with pytest.raises(ValueError, match="flag"):
        MXRecordIO(copy_dir / "train.rec", "a")


def test_binary_junk_idx_names_the_file_and_line(copy_dir):
    """Was: `'utf-8' codec can't decode byte 0x9e ...` with no file name."""
    lines = (copy_dir / "train.idx").read_bytes().split(b"\n")
    (copy_dir / "train.idx").write_bytes(b"\n".join([*lines[:4], b"\x9e\x07junk\xff", *lines[4:]]))
    with pytest.raises(RecordIOError, match=r"train\.idx: line 5 is not text \(byte 0x9e\): not a RecordIO index"):
        open_fixture(copy_dir)


@pytest.mark.parametrize("line", [b"5\t99999999999999999999999", b"99999999999999999999999\t0", b"5\t-8"])
def test_idx_numbers_beyond_int64_or_negative_are_refused(copy_dir, line):
    (copy_dir / "train.idx").write_bytes((copy_dir / "train.idx").read_bytes() + line + b"\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: (line 74|key \d+ has offset)"):
        open_fixture(copy_dir)


def test_short_records_raise_recordio_errors_naming_file_and_key(tmp_path):
    """Was: a bare struct.error (`unpack_from requires a buffer of at least 24 bytes`)."""
    with MXIndexedRecordIO(tmp_path / "s.idx", tmp_path / "s.rec", "w") as writer:
        writer.write_idx(1, b"short")
        writer.write_idx(2, recordio.pack(IRHeader(0, [1.0, 2.0, 3.0], 2, 0), b"")[:30])
    reader = MXIndexedRecordIO(tmp_path / "s.idx", tmp_path / "s.rec", "r")
    for key, message in ((1, "a record of 5 bytes is shorter than the 24-byte IRHeader"),
                         (2, "IRHeader flag 3 needs 12 bytes of labels, the record has 6")):
        with pytest.raises(RecordIOError, match=rf"s\.rec key {key} at offset \d+: {message}"):
            reader.read_images(np.array([key]))
        with pytest.raises(RecordIOError, match=rf"s\.rec key {key} at offset \d+: {message}"):
            reader.read_header(key)
        with pytest.raises(RecordIOError, match=message):
            recordio.unpack(reader.read_idx(key))


def test_dense_lookup_needs_distinct_keys(tmp_path):
    """Keys 0, 1, 1, 3 span 4 entries without key 2: key 2 must be missing, not another record."""
    with MXIndexedRecordIO(tmp_path / "d.idx", tmp_path / "d.rec", "w") as writer:
        for key in (0, 1, 1, 3):
            writer.write_idx(key, recordio.pack(IRHeader(0, float(key), key, 0), b"x"))
    reader = MXIndexedRecordIO(tmp_path / "d.idx", tmp_path / "d.rec", "r")
    assert 2 not in reader and recordio.unpack(reader.read_idx(3))[0].label == 3.0
    assert reader.covers(0, 2) and not reader.covers(0, 4) and reader.covers(3, 4) and reader.covers(5, 5)


# -- reader and writer are separate classes behind mxnet's two entry points ----------------------------------
def test_the_flag_picks_a_reader_or_a_writer_class(tmp_path):
    from mxnet_reader import IndexedRecordReader, IndexedRecordWriter, RecordReader, RecordWriter

    with MXIndexedRecordIO(tmp_path / "t.idx", tmp_path / "t.rec", flag="w") as writer:
        assert type(writer) is IndexedRecordWriter and isinstance(writer, (MXIndexedRecordIO, MXRecordIO))
        writer.write_idx(3, b"three")
        assert writer.keys == [3] and 3 in writer and len(writer) == 1 and not hasattr(writer, "read_idx")
    reader = MXIndexedRecordIO(tmp_path / "t.idx", tmp_path / "t.rec", "r")
    assert type(reader) is IndexedRecordReader and isinstance(reader, MXIndexedRecordIO)
    assert reader.read_idx(3) == b"three" and not hasattr(reader, "write_idx") and not hasattr(reader, "write")
    assert type(MXRecordIO(tmp_path / "t.rec", "r")) is RecordReader
    sequential = MXRecordIO(tmp_path / "u.rec", "w")
    assert type(sequential) is RecordWriter and not hasattr(sequential, "read")
    sequential.abort()
    assert IndexedRecordReader(tmp_path / "t.idx", tmp_path / "t.rec").keys == [3]  # the classes directly
    with pytest.raises(ValueError, match="flag 'r', got 'w'"):
        RecordReader(tmp_path / "t.rec", "w")
