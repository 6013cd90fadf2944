"""dataset.py: what arcface_torch sees on the mxnet fixture, layouts, bad input, sampler and exact resume."""

import hashlib
import json
import pickle
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import dataset as D
from mxnet_reader.recordio import IRHeader, MXIndexedRecordIO, RecordIOError, pack, pack_img, unpack
from utils.image import decode_rgb, preprocess


def face_like(rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """A smooth random BGR image (JPEG-friendly, like a face crop)."""
    return cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)


def write_rec(root, labels, *, header=True, payloads=None, records=None, order=None, label_fn=float, size=112):
    """An InsightFace-style train.rec/idx in face2rec2's order: images 1..n, header 0, identity records.
    `payloads` replaces the image of a key, `records` the whole record (IRHeader included)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(labels))
    n = len(labels)
    with MXIndexedRecordIO(root / "train.idx", root / "train.rec", "w") as writer:
        for key in order or range(1, n + 1):
            label = label_fn(labels[key - 1])
            if records and key in records:
                writer.write_idx(key, records[key])
            elif payloads and key in payloads:
                writer.write_idx(key, pack(IRHeader(0, label, key, 0), payloads[key]))
            else:
                writer.write_idx(key, pack_img(IRHeader(0, label, key, 0), face_like(rng, size)))
        if header:
            classes = sorted(set(labels))
            writer.write_idx(0, pack(IRHeader(0, [n + 1, n + 1 + len(classes)], 0, 0), b""))
            for j, c in enumerate(classes):
                keys = [k + 1 for k, lab in enumerate(labels) if lab == c]
                writer.write_idx(n + 1 + j, pack(IRHeader(0, [keys[0], keys[-1] + 1], n + 1 + j, 0), b""))
    return root


def rgb_of(ds, index):
    return decode_rgb(unpack(ds._reader.read_idx(int(ds._keys[index])))[1])


def cfg_for(data, **kw):
    base = dict(data=str(data), batch_size=4, num_workers=0, seed=7, num_classes=None, cache_dir=".cache",
                synthetic_identities=4, synthetic_images_per_id=2, synthetic_val_pairs=4)
    return SimpleNamespace(**{**base, **kw})


# -- the mxnet fixture ---------------------------------------------------------------------------------------
def test_mxnet_fixture_reads_as_arcface_torch_does(shared_fixtures):
    root = shared_fixtures / "mxnet_written"
    expected = json.loads((root / "expected.json").read_text())
    ds = D.RecordIODataset(root, train=False)
    view = expected["arcface_torch_MXFaceDataset_view"]
    assert len(ds) == view["len"] and ds.num_classes == expected["num_classes"]
    assert list(ds._keys) == view["imgidx"]
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(label, np.int64) and label == view["labels"][i]
        assert image.dtype == np.float32 and image.shape == (3, 112, 112)
        rgb = rgb_of(ds, i)
        assert hashlib.md5(rgb.tobytes()).hexdigest() == expected["records"][str(i + 1)]["mx_image_imdecode_rgb"]["md5"]
        np.testing.assert_array_equal(image, preprocess(rgb))


def splitmix64_flip(seed: int, epoch: int, index: int) -> bool:
    """The flip rule with Python integers, one sample at a time: the reference for flip_mask."""
    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        return x ^ (x >> 31)
    return bool(mix(mix(mix(seed) ^ epoch) ^ index) >> 63)


def flip_mask_list(seed, epoch, indices):
    return D.flip_mask(seed, epoch, indices).tolist()


def test_flip_mask_is_splitmix64_of_seed_epoch_and_index():
    indices = np.array([0, 1, 2, 3, 1000, 2**31 + 5, 42_474_556])
    for seed, epoch in [(0, 0), (7, 3), (2**40 + 1, 19)]:
        assert flip_mask_list(seed, epoch, indices) == [splitmix64_flip(seed, epoch, i) for i in indices.tolist()]
    many = D.flip_mask(0, 0, np.arange(10_000))
    assert 4800 < many.sum() < 5200


def test_training_flips_depend_on_seed_epoch_and_index(shared_fixtures):
    ds = pickle.loads(pickle.dumps(D.RecordIODataset(shared_fixtures / "mxnet_written", train=True, seed=3)))
    everything = np.arange(len(ds))
    flips = flip_mask_list(3, 0, everything)
    assert 15 < sum(flips) < 45
    for i in range(0, len(ds), 5):
        np.testing.assert_array_equal(ds[i][0], preprocess(rgb_of(ds, i), flip=flips[i]))
    ds.set_epoch(1)
    assert flip_mask_list(3, 1, everything) != flips
    assert flip_mask_list(4, 0, everything) != flips
    np.testing.assert_array_equal(ds[np.int64(2)][0], preprocess(rgb_of(ds, 2), flip=flip_mask_list(3, 1, [2])[0]))
    with pytest.raises(IndexError, match="index 60 out of range for 60 samples"):
        ds[60]


def test_model_input_equals_preprocess_on_cpu_and_with_paddle_ops():
    import paddle

    from utils.loader import _normalise_with_paddle_ops as normalise_with_paddle_ops

    batch = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    batch[0, 0, :4, 0] = [0, 127, 128, 255]
    expected = np.stack([preprocess(im) for im in batch])
    np.testing.assert_array_equal(D.to_model_input(paddle.to_tensor(batch)).numpy(), expected)
    np.testing.assert_array_equal(normalise_with_paddle_ops(paddle.to_tensor(batch)).numpy(), expected)


# -- layouts ------------------------------------------------------------------------------------------------
def test_header_bounds_are_pinned_beyond_float32_precision():
    true_end = 42_474_557  # a WebFace42M-sized image count: float32 cannot hold it
    approx = float(np.float32(true_end))
    assert int(approx) != true_end  # what reading the header naively (arcface_torch) would use
    assert D.exact_bound(approx, lambda k: k >= true_end) == true_end
    assert D.exact_bound(approx, lambda k: k >= true_end + 40) is None
    assert D.exact_bound(61.0, lambda k: k >= 61) == 61


def rewrite_header(root, label):
    """Replace header record 0 of an InsightFace set by one with this label."""
    with MXIndexedRecordIO(root / "x.idx", root / "x.rec", "w") as writer:
        reader = MXIndexedRecordIO(root / "train.idx", root / "train.rec", "r")
        for key in reader.keys:
            writer.write_idx(key, pack(IRHeader(0, label, 0, 0), b"") if key == 0 else reader.read_idx(key))
    (root / "x.idx").replace(root / "train.idx")
    (root / "x.rec").replace(root / "train.rec")


@pytest.mark.parametrize("label, message", [
    ([3, 7], r"header record 0 puts the end of the image records at key 3"),
    ([9, 11], r"train\.rec key 0: the header record's key range \[9, 11\) is not inside the index .*keys end at 6"),
    ([5, 3e38], r"key range \[5, 3\d+\) is not inside"),  # took forever: a search over float32 rounding of 3e38
    ([float("nan"), 7], r"key range \[nan, 7\) is not inside"),  # was `cannot convert float NaN to integer`
], ids=["images-end-early", "beyond-the-index", "3e38", "nan"])
def test_header_that_disagrees_with_the_records_is_an_error(tmp_path, label, message):
    root = write_rec(tmp_path / "d", [0, 0, 1, 1])
    rewrite_header(root, label)
    with pytest.raises(RecordIOError, match=message):
        D.RecordIODataset(root)


def test_without_header_the_index_keys_are_used(tmp_path):
    labels = [2, 0, 1, 2, 0]
    root = write_rec(tmp_path / "s", labels, header=False, order=[3, 1, 5, 2, 4])
    ds = D.RecordIODataset(root, train=False)
    assert list(ds._keys) == [3, 1, 5, 2, 4] and ds.num_classes == 3  # num_classes from a scan of the labels
    assert [int(ds[i][1]) for i in range(5)] == [1, 2, 0, 0, 2]
    (root / "property").write_text("10,112,112")
    assert D.RecordIODataset(root).num_classes == 10


def test_multi_float_labels_use_the_first_value(tmp_path):
    root = write_rec(tmp_path / "m", [0, 1, 1], label_fn=lambda c: [float(c), 0.25])
    ds = D.RecordIODataset(root, train=False)
    assert unpack(ds._reader.read_idx(1))[0].flag == 2
    assert [int(ds[i][1]) for i in range(3)] == [0, 1, 1] and ds.num_classes == 2


def test_image_folder_label_file_and_identity_folders(tmp_path):
    rng = np.random.default_rng(0)
    images = [face_like(rng) for _ in range(4)]
    for name, img in zip(["a b/1.png", "c/2.png", "c/3.png", "d/4.png"], images, strict=True):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / name), img)
    (tmp_path / "label.txt").write_text("a b/1.png\t1\nc/2.png 0\n\nd/4.png  2\n")
    ds = D.ImageFolderDataset(tmp_path, train=False)
    assert len(ds) == 3 and ds.num_classes == 3
    assert [int(ds[i][1]) for i in range(3)] == [1, 0, 2]
    np.testing.assert_array_equal(ds[0][0], preprocess(images[0][:, :, ::-1].copy()))
    (tmp_path / "label.txt").unlink()
    ds = D.ImageFolderDataset(tmp_path, train=False)  # root/<identity>/<img>, identities sorted
    assert [int(ds[i][1]) for i in range(4)] == [0, 1, 1, 2] and ds.num_classes == 3
    np.testing.assert_array_equal(ds[3][0], preprocess(images[3][:, :, ::-1].copy()))


def test_identity_folders_take_every_image_kind_a_gallery_takes(tmp_path):
    """One IMAGE_EXTENSIONS for training folders and the gallery tools: a .tif went into a gallery, not training."""
    image = face_like(np.random.default_rng(1))
    for name in ("a/1.tif", "a/2.TIFF", "b/3.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / name), image)
    ds = D.ImageFolderDataset(tmp_path, train=False)
    assert len(ds) == 3 and [int(ds[i][1]) for i in range(3)] == [0, 0, 1]
    np.testing.assert_array_equal(ds[0][0], preprocess(image[:, :, ::-1].copy()))


def test_build_dataset_and_dataset_dir(tmp_path):
    rec = write_rec(tmp_path / "rec", [0, 1, 0, 1])
    assert isinstance(D.build_dataset(cfg_for(rec)), D.RecordIODataset)
    assert D.dataset_dir(cfg_for(rec)) == rec
    folder = tmp_path / "folder" / "x"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "1.jpg"), np.zeros((112, 112, 3), np.uint8))
    assert isinstance(D.build_dataset(cfg_for(folder.parent)), D.ImageFolderDataset)
    assert D.build_dataset(cfg_for(rec, num_classes=5)).num_classes == 5
    with pytest.raises(FileNotFoundError, match=r"dataset not found: .*missing"):
        D.build_dataset(cfg_for(tmp_path / "missing"))


def test_synthetic_dataset_is_a_recordio_dataset(tmp_path):
    synthetic = pytest.importorskip("synthetic")
    if not hasattr(synthetic, "ensure_synthetic"):
        pytest.skip("synthetic.ensure_synthetic not written yet")
    cfg = cfg_for("synthetic", cache_dir=str(tmp_path))
    assert not D.dataset_dir(cfg).exists()  # a getter: generating is prepare_dataset's job
    assert D.prepare_dataset(cfg) == D.dataset_dir(cfg) and D.dataset_dir(cfg).is_dir()
    ds = D.build_dataset(cfg)
    assert isinstance(ds, D.SyntheticFaceDataset) and len(ds) == 8 and ds.num_classes == 4
    assert D.dataset_dir(cfg) == Path(ds.source) and (Path(ds.source) / "synth_val.bin").is_file()
    image, label = ds[0]
    assert image.shape == (3, 112, 112) and 0 <= label < 4


# -- bad input ----------------------------------------------------------------------------------------------
def substitutes_in(record) -> list[int]:
    """The sample indices that bad-sample warnings say were used instead, in order."""
    found = (re.search(r"using sample (\d+) \(key \d+\) instead", str(w.message)) for w in record)
    return [int(m.group(1)) for m in found if m]


def test_corrupt_jpeg_warns_with_key_and_substitutes_unless_strict(tmp_path):
    root = write_rec(tmp_path / "c", [0, 0, 1, 1], payloads={2: b"\xff\xd8 not a jpeg"})
    ds = D.RecordIODataset(root, train=False)
    with pytest.warns(UserWarning, match=f"{re.escape(str(root))}: key 2 is not a decodable image; using sample") as w:
        image, label = ds[1]
    (other,) = substitutes_in(w)
    assert other != 1
    np.testing.assert_array_equal(image, ds[other][0])
    assert label == ds[other][1]
    with pytest.raises(ValueError, match="key 2 is not a decodable image"):
        D.RecordIODataset(root, strict=True)[1]


def bad_records_set(root, n=12):
    """n images; keys 3..7 are bad, one of each kind, in a row: a record shorter than its IRHeader, a label too
    long for its record, a non-integer label, an undecodable image and a misframed record."""
    jpeg = pack_img(IRHeader(0, 1.0, 0, 0), face_like(np.random.default_rng(1)))[24:]
    records = {3: b"short", 4: pack(IRHeader(0, [1.0] * 3, 4, 0), b"")[:28],
               5: pack(IRHeader(0, 2.5, 5, 0), jpeg), 6: pack(IRHeader(0, 1.0, 6, 0), b"\xff\xd8 not a jpeg")}
    write_rec(root, [k % 3 for k in range(n)], records=records, header=False)
    (root / "property").write_text("3,112,112\n")
    reader = MXIndexedRecordIO(root / "train.idx", root / "train.rec", "r")
    data = bytearray((root / "train.rec").read_bytes())
    data[reader.offset_of(7):reader.offset_of(7) + 4] = b"XXXX"  # no magic: not a record boundary
    (root / "train.rec").write_bytes(bytes(data))
    return root


BAD_RECORDS = {3: r"key 3 at offset \d+: a record of 5 bytes is shorter than the 24-byte IRHeader",
               4: r"key 4 at offset \d+: IRHeader flag 3 needs 12 bytes of labels, the record has 4",
               5: r"key 5: label 2.5 is not a class number",
               6: r"key 6 is not a decodable image",
               7: r"key 7 at offset \d+: not a record boundary"}


def test_bad_records_of_any_kind_are_warned_with_file_and_key_and_replaced_by_good_samples(tmp_path, monkeypatch):
    """Was: a short record raised a bare struct.error, and each substitute was the next index, so a run of bad
    records cascaded into that crash."""
    monkeypatch.setattr("mxnet_reader.reader._OPEN_CHECK_SAMPLES", 2)  # as in a big set: key 7 is not checked
    root = bad_records_set(tmp_path / "bad")
    ds = D.RecordIODataset(root, train=False)
    images, labels = np.empty((12, 112, 112, 3), np.uint8), np.empty(12, np.int64)
    with pytest.warns(UserWarning) as record:
        ds.load_batch(np.arange(12), 0, images, labels)
    messages = [str(w.message) for w in record]
    assert len(messages) == 5
    for pattern, message in zip(BAD_RECORDS.values(), messages, strict=True):
        assert re.search(pattern, message) and (str(root) in message), message
    good = [i for i in range(12) if i + 1 not in BAD_RECORDS]
    for i, other in zip(range(2, 7), substitutes_in(record), strict=True):
        assert other in good  # never another bad record
        np.testing.assert_array_equal(images[i], ds.load_uint8(other, 0)[0])
        assert labels[i] == other % 3
    strict = D.RecordIODataset(root, train=False, strict=True)
    for key, pattern in BAD_RECORDS.items():
        with pytest.raises(ValueError, match=pattern) as info:  # RecordIOError is a ValueError
            strict[key - 1]
        assert str(root) in str(info.value)


def test_an_image_claiming_too_many_pixels_is_a_bad_sample_not_a_decode(tmp_path):
    """Was: decoded at the size its header claims (8000x8000: 192 MB per bad record) before anything else."""
    jpeg = pack_img(IRHeader(0, 1.0, 0, 0), face_like(np.random.default_rng(1)))[24:]
    sof = jpeg.index(b"\xff\xc0")
    claims = jpeg[:sof + 5] + struct.pack(">HH", 8000, 8000) + jpeg[sof + 9:]
    root = write_rec(tmp_path / "big", [0, 1, 0, 1], payloads={2: claims})
    with pytest.warns(UserWarning, match=r"key 2 claims 64000000 pixels in its header: a corrupt image; using sample"):
        D.RecordIODataset(root, train=False)[1]
    with pytest.raises(ValueError, match=r"key 2 claims 64000000 pixels"):
        D.RecordIODataset(root, train=False, strict=True)[1]


def test_a_set_without_good_samples_is_a_clear_error(tmp_path):
    root = write_rec(tmp_path / "all", [0, 1, 0], records={k: b"short" for k in (1, 2, 3)}, header=False)
    (root / "property").write_text("2,112,112\n")
    with pytest.raises(ValueError, match=r"key 2 at offset \d+: a record of 5 bytes is shorter.*none of the 64 "
                                         r"samples tried in its place is readable either: .*all looks corrupt"):
        D.RecordIODataset(root)[1]


def test_substitutes_are_spread_over_the_set_and_deterministic():
    ds = D.FaceDataset("x", train=True, strict=False, seed=3)
    ds._length = 1000
    tried = ds._substitutes(500)
    assert len(tried) == 64 and 500 not in tried and all(0 <= i < 1000 for i in tried)
    assert max(tried) - min(tried) > 500 and tried == ds._substitutes(500) != ds._substitutes(501)


def test_label_outside_num_classes_is_an_error(tmp_path):
    root = write_rec(tmp_path / "l", [0, 1, 5, 1])
    with pytest.raises(ValueError, match=r"key 3 has label 5 outside \[0, 3\)"):
        D.RecordIODataset(root, num_classes=3)[2]
    (tmp_path / "f").mkdir()
    cv2.imwrite(str(tmp_path / "f" / "a.jpg"), np.zeros((112, 112, 3), np.uint8))
    (tmp_path / "f" / "label.txt").write_text("a.jpg\t4\n")
    with pytest.raises(ValueError, match=r"a\.jpg has label 4 outside \[0, 2\)"):
        D.ImageFolderDataset(tmp_path / "f", num_classes=2)
    (tmp_path / "f" / "label.txt").write_text("a.jpg\n")
    with pytest.raises(ValueError, match=r"label\.txt: line 1 is not 'path<TAB>label'"):
        D.ImageFolderDataset(tmp_path / "f")


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        D.RecordIODataset(write_rec(tmp_path / "e", [], header=False), num_classes=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        D.ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"train\.rec not found"):
        D.RecordIODataset(tmp_path / "empty")


def test_non_112_images_are_resized_with_one_warning_or_rejected_when_strict(tmp_path):
    root = write_rec(tmp_path / "r", [0, 1, 0], size=128)
    ds = D.RecordIODataset(root, train=False)
    with pytest.warns(UserWarning, match="key 1 is 128x128; resizing images to 112x112") as record:
        images = [ds[i][0] for i in range(3)]
    assert len(record) == 1 and all(im.shape == (3, 112, 112) for im in images)
    resized = cv2.resize(rgb_of(ds, 0), (112, 112), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(images[0], preprocess(resized))
    with pytest.raises(ValueError, match="key 1 is 128x128, expected 112x112"):
        D.RecordIODataset(root, strict=True)[0]


@pytest.mark.filterwarnings("ignore:.*resizing images")
def test_substituted_and_resized_samples_are_mirrored_like_any_other(tmp_path):
    """Mirroring happens after decoding: substitutes and resized images are mirrored like the others."""
    root = write_rec(tmp_path / "m", [0, 1, 0, 1, 0, 1], size=128, payloads={3: b"\xff\xd8 not a jpeg"})
    ds = D.RecordIODataset(root, train=True, seed=5)
    images, labels = np.empty((6, 112, 112, 3), np.uint8), np.empty(6, np.int64)
    seen = set()
    for epoch in range(6):
        flips = flip_mask_list(5, epoch, np.arange(6))
        with pytest.warns(UserWarning, match="key 3 is not a decodable image; using sample") as w:
            ds.load_batch(np.arange(6), epoch, images, labels)
        (other,) = substitutes_in(w)
        sources = [0, 1, other, 3, 4, 5]
        rgb = [cv2.resize(rgb_of(ds, i), (112, 112), interpolation=cv2.INTER_AREA) for i in sources]
        for i in range(6):
            np.testing.assert_array_equal(images[i], rgb[i][:, ::-1] if flips[i] else rgb[i])
        assert labels.tolist() == [0, 1, other % 2, 1, 0, 1]
        seen.update(flips[2:3])
    assert seen == {True, False}  # the substitute was decoded both ways


# -- sampler, loader, resume --------------------------------------------------------------------------------
def indices(batch):
    return [i for i, _ in batch]


def test_sampler_shards_are_disjoint_deterministic_and_change_per_epoch():
    shards = [list(D.ShardedBatchSampler(103, 5, rank=r, world_size=3, seed=1)) for r in range(3)]
    assert all(len(s) == 6 for s in shards)  # 103 // 15 global batches, the tail is dropped
    flat = [i for s in shards for b in s for i in indices(b)]
    assert len(flat) == 90 == len(set(flat))
    assert all(epoch == 0 for s in shards for b in s for _, epoch in b)
    again = list(D.ShardedBatchSampler(103, 5, rank=1, world_size=3, seed=1))
    assert again == shards[1]
    sampler = D.ShardedBatchSampler(103, 5, rank=1, world_size=3, seed=1)
    sampler.set_epoch(1)
    assert [indices(b) for b in sampler] != [indices(b) for b in shards[1]]
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        D.ShardedBatchSampler(10, 4, world_size=3)


@pytest.fixture(scope="module")
def small_rec(tmp_path_factory):
    return write_rec(tmp_path_factory.mktemp("loader") / "d", [k % 5 for k in range(26)])


def run(loader, epochs, stop_after=None):
    """Batches as numpy, epoch by epoch with set_epoch like a training loop; optionally stop early."""
    out = []
    for epoch in range(loader.batch_sampler.epoch, epochs):
        loader.batch_sampler.set_epoch(epoch)
        for images, labels in loader:
            out.append((images.numpy(), labels.numpy()))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def test_loader_batches_equal_the_dataset_and_do_not_depend_on_workers(small_rec):
    cfg = cfg_for(small_rec)
    ds = D.RecordIODataset(small_rec, seed=cfg.seed)
    single = run(D.build_dataloader(cfg, 0, 1, dataset=ds), 2)
    cv2.LUT(np.zeros((2048, 2048), np.uint8), np.zeros(256, np.float32))  # OpenCV's thread pool is live at fork
    multi = run(D.build_dataloader(cfg_for(small_rec, num_workers=2), 0, 1), 2)
    assert len(single) == 12
    for (a, la), (b, lb) in zip(single, multi, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    sampler = D.ShardedBatchSampler(len(ds), cfg.batch_size, seed=cfg.seed)
    sampler.set_epoch(1)
    batch = next(iter(sampler))
    ds.set_epoch(1)
    import paddle

    model_input = D.to_model_input(paddle.to_tensor(single[6][0])).numpy()
    np.testing.assert_array_equal(model_input, np.stack([ds[i][0] for i in indices(batch)]))
    assert single[6][0].dtype == np.uint8 and single[6][0].shape == (4, 112, 112, 3)
    assert single[6][1].dtype == np.int64


@pytest.mark.parametrize("stop_after", [3, 6, 8])  # mid-epoch, exactly at the end of epoch 0, mid-epoch 1
def test_state_dict_resumes_exactly(small_rec, stop_after):
    cfg = cfg_for(small_rec)
    uninterrupted = run(D.build_dataloader(cfg, 0, 1), 2)
    first = D.build_dataloader(cfg, 0, 1)
    head = run(first, 2, stop_after=stop_after)
    state = first.batch_sampler.state_dict()
    resumed = D.build_dataloader(cfg, 0, 1)
    resumed.batch_sampler.load_state_dict(state)
    tail = run(resumed, 2)
    assert len(head) + len(tail) == len(uninterrupted)
    for (a, la), (b, lb) in zip(head + tail, uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_resume_with_another_world_size_keeps_the_sample_position():
    two = [D.ShardedBatchSampler(64, 4, rank=r, world_size=2, seed=0) for r in range(2)]
    for s in two:
        s.mark_consumed()
        s.mark_consumed()  # 2 global batches of 8 = 16 samples consumed
    one = D.ShardedBatchSampler(64, 8, seed=0)
    one.load_state_dict(two[0].state_dict())
    assert one.consumed == 2
    seen_two = {i for s in two for b in list(s) for i in indices(b)}
    assert {i for b in one for i in indices(b)} == seen_two
    odd = D.ShardedBatchSampler(64, 5, seed=0)
    with pytest.warns(UserWarning, match="samples of the epoch are skipped"):
        odd.load_state_dict(two[0].state_dict())
    with pytest.raises(ValueError, match="num_samples=64"):
        D.ShardedBatchSampler(65, 8, seed=0).load_state_dict(two[0].state_dict())


# -- worker processes: same batches, failures, shutdown ------------------------------------------------------
def worker_processes(loader):
    return list(loader._pool._processes) if loader._pool is not None else []


def test_batches_are_the_same_with_0_1_2_workers_and_resume_with_workers(small_rec):
    reference = run(D.build_dataloader(cfg_for(small_rec), 0, 1), 2)
    for workers in (1, 2):
        loader = D.build_dataloader(cfg_for(small_rec, num_workers=workers), 0, 1)
        head = run(loader, 2, stop_after=4)  # abandons batches in flight: the next iteration must not see them
        resumed = D.build_dataloader(cfg_for(small_rec, num_workers=workers), 0, 1)
        resumed.batch_sampler.load_state_dict(loader.batch_sampler.state_dict())
        for got in (head + run(loader, 2), head + run(resumed, 2)):
            assert len(got) == len(reference)
            for (a, la), (b, lb) in zip(got, reference, strict=True):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(la, lb)
        loader.close()
        resumed.close()


def test_batch_tensors_stay_valid_while_used(small_rec):
    """Batch arrays are recycled once Paddle frees a tensor: a kept batch, or a model input an autograd graph
    still needs, must never be overwritten by later batches."""
    import paddle

    loader = D.build_dataloader(cfg_for(small_rec, num_workers=1), 0, 1)
    kept = [(images, images.numpy().copy()) for images, _ in loader]  # holds every slot: later batches are copies
    assert all(np.array_equal(t.numpy(), copy) for t, copy in kept)
    del kept
    lent = [np.shares_memory(np.from_dlpack(images), loader._pool.images) for images, _ in loader]
    assert all(lent)  # batches dropped at once: each one is its worker's slot itself, no copy
    weight = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32))
    weight.stop_gradient = False
    batches = iter(loader)
    first = D.to_model_input(next(batches)[0])
    expected = first.numpy().copy()
    out = paddle.nn.functional.conv2d(first, weight, stride=8)
    loss = (out * out).sum()
    del first, out
    for _ in range(4):  # later batches and inputs, each freed at once: they recycle any array given back
        D.to_model_input(next(batches)[0])
    loss.backward()
    reference = paddle.to_tensor(weight.numpy())
    reference.stop_gradient = False
    ref_out = paddle.nn.functional.conv2d(paddle.to_tensor(expected), reference, stride=8)
    (ref_out * ref_out).sum().backward()
    np.testing.assert_allclose(weight.grad.numpy(), reference.grad.numpy(), rtol=1e-6)
    loader.close()


def test_workers_started_by_spawn_give_the_same_batches(small_rec):
    """Windows (and macOS if asked) have no fork: was a warning and every batch loaded in the training process.
    One spawned worker (it imports Paddle: seconds, so one epoch); its slots are named shared memory that is
    gone after close()."""
    from multiprocessing import shared_memory

    cfg = cfg_for(small_rec, num_workers=1)
    want = run(D.build_dataloader(cfg_for(small_rec), 0, 1), 1)
    dataset = D.build_dataset(cfg)
    loader = D.FaceDataLoader(dataset, D.ShardedBatchSampler(len(dataset), 4, seed=cfg.seed), num_workers=1,
                              start_method="spawn", timeout=60)
    got = run(loader, 1)
    assert [type(p).__name__ for p in loader._pool._processes] == ["SpawnProcess"]
    name = loader._pool.slots._shared.name
    loader.close()
    assert len(got) == len(want) == 6
    for (images, labels), (want_images, want_labels) in zip(got, want, strict=True):
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)
    with pytest.raises(ValueError, match="start_method 'nope' is not available here"):
        D.FaceDataLoader(dataset, loader.batch_sampler, num_workers=1, start_method="nope")


def test_a_killed_worker_is_a_clear_error_not_a_hang(small_rec):
    import os
    import signal
    import time

    # 13 batches of 2 for 6 slots: the victim has work left after the kill, whatever it had done before
    loader = D.build_dataloader(cfg_for(small_rec, num_workers=2, batch_size=2), 0, 1)
    batches = iter(loader)
    next(batches)
    victim = worker_processes(loader)[1]
    os.kill(victim.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"loader worker 1 \(pid {victim.pid}\) was killed by signal 9"):
        list(batches)
    assert time.monotonic() - start < 5
    assert loader._pool is None or not loader._pool.close.alive  # the surviving worker was stopped too
    consumed = loader.batch_sampler.consumed
    assert 1 <= consumed < 13 and len(run(loader, 1)) == 13 - consumed  # new workers finish the epoch
    loader.close()


def test_dataset_errors_in_workers_are_raised_with_their_type(tmp_path):
    root = write_rec(tmp_path / "c", [k % 2 for k in range(8)], payloads={3: b"\xff\xd8 not a jpeg"})
    loader = D.build_dataloader(cfg_for(root, num_workers=1, batch_size=8), 0, 1,
                                dataset=D.RecordIODataset(root, strict=True))
    with pytest.raises(ValueError, match="key 3 is not a decodable image") as info:
        next(iter(loader))
    assert any("in loader worker pid" in note for note in info.value.__notes__)
    processes = worker_processes(loader)
    assert processes and all(p.is_alive() for p in processes)  # a bad sample does not cost the workers
    loader.close()
    assert not any(p.is_alive() for p in processes)


def test_workers_stop_on_close_garbage_collection_and_ignore_ctrl_c(small_rec):
    import gc
    import os
    import signal

    loader = D.build_dataloader(cfg_for(small_rec, num_workers=2), 0, 1)
    batches = iter(loader)
    next(batches)
    processes = worker_processes(loader)
    os.kill(processes[0].pid, signal.SIGINT)  # Ctrl-C reaches the whole process group: only we may react
    assert len(list(batches)) == 5 and all(p.is_alive() for p in processes)
    del batches, loader
    gc.collect()
    assert not any(p.is_alive() for p in processes)


def test_workers_exit_when_the_training_process_dies(small_rec, tmp_path):
    """A SIGKILLed (out-of-memory) training process must not leave its workers behind."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys\n"
        "import dataset as D\n"
        "from types import SimpleNamespace\n"
        f"cfg = SimpleNamespace(data={str(small_rec)!r}, batch_size=4, num_workers=2, seed=0, num_classes=None)\n"
        "loader = D.build_dataloader(cfg, 0, 1)\n"
        "next(iter(loader))\n"
        "print(*(p.pid for p in loader._pool._processes), flush=True)\n"
        "os._exit(0)  # no clean-up at all, as after SIGKILL\n")
    env = {**os.environ, "PYTHONPATH": str(Path(D.__file__).parent)}
    pids = [int(p) for p in subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                                           check=True, timeout=60).stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


# -- label.txt: what editors write, and labels that are typos -------------------------------------------------
def image_folder(root, lines: bytes, names=("a.jpg", "b.jpg", "c.jpg")):
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(root / "images" / name), np.full((112, 112, 3), 40 * i, np.uint8))
    (root / "label.txt").write_bytes(lines)
    return root


def test_label_file_with_bom_and_crlf_reads_like_a_plain_one(tmp_path):
    """Was: the first path became '\\ufeffimages/a.jpg' (what Windows Notepad writes) and was substituted."""
    plain = b"images/a.jpg\t0\nimages/b.jpg 1\nimages/c.jpg\t1\n"
    notepad = b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n")
    want = D.ImageFolderDataset(image_folder(tmp_path / "plain", plain), train=False, strict=True)
    got = D.ImageFolderDataset(image_folder(tmp_path / "notepad", notepad), train=False, strict=True)
    assert got._paths == want._paths == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    assert got.num_classes == 2
    for i in range(3):
        np.testing.assert_array_equal(got[i][0], want[i][0])


@pytest.mark.parametrize("lines, message", [
    (b"images/a.jpg\t0\nimages/b.jpg\t99999999999\nimages/c.jpg\t1\n",
     r"label\.txt: line 2: label 99999999999 would make 100000000000 classes, but only 3 distinct labels"),
    (b"images/a.jpg\t0\nimages/b.jpg\t-3\n", r"label\.txt: line 2: label -3 is not a class number"),
    (b"images/a.jpg\t0\nimages/b.jpg\t" + b"9" * 30 + b"\n", r"label\.txt: line 2: label 9{30} is not a class"),
    (b"images/a.jpg\t0\n\xe9t\xe9.jpg\t1\n", r"label\.txt: line 2 is not UTF-8 text \(byte 0xe9\)"),
], ids=["huge", "negative", "beyond-int64", "latin-1"])
def test_label_file_typos_are_one_clear_line(tmp_path, lines, message):
    """Was: `Unable to allocate 23.3 TiB` (num_classes = largest label + 1, unchecked)."""
    with pytest.raises(ValueError, match=message):
        D.ImageFolderDataset(image_folder(tmp_path / "f", lines))


def test_sparse_labels_are_accepted_within_reason(tmp_path):
    root = image_folder(tmp_path / "f", b"images/a.jpg\t0\nimages/b.jpg\t1000\nimages/c.jpg\t7\n")
    assert D.ImageFolderDataset(root).num_classes == 1001  # a few gaps: the set is usable as labelled
    assert D.ImageFolderDataset(root, num_classes=5000).num_classes == 5000  # given: the caller's choice


def test_recordio_class_counts_from_property_or_a_scan_are_checked(tmp_path):
    root = write_rec(tmp_path / "p", [0, 1, 1, 0])
    (root / "property").write_text("99999999999,112,112\n")
    with pytest.raises(ValueError, match=r"property: 99999999999 classes, but the set has only 2 identities"):
        D.RecordIODataset(root)
    root = write_rec(tmp_path / "s", [0, 1, 5000, 0], header=False)
    with pytest.raises(ValueError, match=r"/s: key 3 has label 5000, but the set has only 3 distinct labels"):
        D.RecordIODataset(root)
