"""Data tools: byte-exact round trips (rec <-> images, .bin <-> folder), label remapping, validation, --force."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from eval.bin_io import load_bin, read_bin, write_bin
from mxnet_reader import MXIndexedRecordIO, unpack
from tools import bin_tool, check_dataset, images2rec, rec2images

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("rec2images", "images2rec", "check_dataset", "bin_tool")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _image(value: int, size: tuple[int, int] = (112, 112), ext: str = ".jpg") -> bytes:
    img = np.full((*size, 3), value, np.uint8)
    cv2.circle(img, (size[1] // 2, size[0] // 2), 20, (255 - value, value, 128), -1)
    return cv2.imencode(ext, img)[1].tobytes()


@pytest.mark.parametrize("tool", TOOLS)
def test_help_as_script_and_module(tool, tmp_path):
    script = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    module = subprocess.run([sys.executable, "-m", f"tools.{tool}", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and module.returncode == 0, script.stderr + module.stderr
    assert "usage:" in script.stdout and script.stdout == module.stdout


def test_rec_to_images_to_rec_is_byte_exact(shared_fixtures, tmp_path):
    """mxnet-written rec -> image files (payloads unchanged) -> rec identical to mxnet's, byte for byte."""
    src = shared_fixtures / "mxnet_written"
    expected = json.loads((src / "expected.json").read_text())
    assert rec2images.main([str(src), str(tmp_path / "img")]) == 0
    rec = MXIndexedRecordIO(src / "train.idx", src / "train.rec", "r")
    lines = (tmp_path / "img" / "label.txt").read_text().splitlines()
    assert len(lines) == 60
    for key, line in zip(range(1, 61), lines, strict=True):
        header, payload = unpack(rec.read_idx(key))
        assert line == f"images/{int(header.label)}/{key}.jpg\t{int(header.label)}"
        assert (tmp_path / "img" / line.split("\t")[0]).read_bytes() == payload
    assert images2rec.main([str(tmp_path / "img"), str(tmp_path / "rec")]) == 0
    for name in ("train.rec", "train.idx", "property"):
        assert _md5(tmp_path / "rec" / name) == expected["files"][name]["md5"], name


def test_images2rec_folders_remap_and_reencode(tmp_path):
    src = tmp_path / "faces"
    files = {"bob/a.jpg": _image(10), "bob/b.png": _image(20, ext=".png"), "alice/x.jpg": _image(30),
             "carol/big.jpg": _image(40, (120, 100)), "carol/c.bmp": _image(50, ext=".bmp")}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    summary = images2rec.images_to_rec(src, tmp_path / "out", progress=False)
    assert summary["identities"] == 3 and summary["images"] == 5 and summary["re_encoded"] == 2
    label_map = json.loads((tmp_path / "out" / "label_map.json").read_text())
    assert label_map["labels"] == {"0": "alice", "1": "bob", "2": "carol"}
    from dataset import RecordIODataset

    ds = RecordIODataset(tmp_path / "out", train=False)
    stored = [ds.raw_sample(i) for i in range(len(ds))]
    assert [label for _, label, _ in stored] == [0, 1, 1, 2, 2]
    assert [p for p, _, _ in stored[:3]] == [files["alice/x.jpg"], files["bob/a.jpg"], files["bob/b.png"]]
    for payload, _, _ in stored[3:]:  # resized / re-encoded
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (112, 112, 3) and payload[:3] == b"\xff\xd8\xff"
    assert (tmp_path / "out" / "property").read_text() == "3,112,112\n"


def test_images2rec_label_txt_sparse_labels(tmp_path):
    src = tmp_path / "listed"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(_image(i * 30))
    (src / "label.txt").write_text("0.jpg\t7\n1.jpg 3\n2.jpg\t100\n3.jpg\t7\n")
    assert images2rec.main([str(src), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "label_map.json").read_text())["labels"] == {"0": 3, "1": 7, "2": 100}
    rec = MXIndexedRecordIO(tmp_path / "out" / "train.idx", tmp_path / "out" / "train.rec", "r")
    got = [(int(unpack(rec.read_idx(k))[0].label), unpack(rec.read_idx(k))[1]) for k in range(1, 5)]
    assert got == [(0, _image(30)), (1, _image(0)), (1, _image(90)), (2, _image(60))]


def test_images2rec_undecodable_image_fails_cleanly(tmp_path, capsys):
    src = tmp_path / "faces"
    (src / "bob").mkdir(parents=True)
    (src / "bob" / "a.jpg").write_bytes(b"not an image")
    assert images2rec.main([str(src), str(tmp_path / "out")]) == 1
    assert "bob/a.jpg: not a decodable image" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.rec").exists()


def test_bin_folder_bin_round_trip(tmp_path):
    images = [_image(v, ext=".png" if v % 20 else ".jpg") for v in range(0, 120, 10)]
    issame = [True, False, True, True, False, False]
    # start from a Python-2-style pickle of str: the tool keeps the bytes, the new .bin is a Python-3 pickle
    original = tmp_path / "set.bin"
    original.write_bytes(pickle.dumps((images, issame), protocol=2))
    assert bin_tool.main(["unpack", str(original), str(tmp_path / "folder")]) == 0
    pairs = (tmp_path / "folder" / "pairs.txt").read_text().splitlines()
    assert pairs[:2] == ["00000.jpg 00001.png 1", "00002.jpg 00003.png 0"]
    assert bin_tool.main(["pack", str(tmp_path / "folder"), str(tmp_path / "again.bin")]) == 0
    bins, same = read_bin(tmp_path / "again.bin")
    assert bins == images and same.tolist() == issame
    a, b = load_bin(original, progress=False), load_bin(tmp_path / "again.bin", progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    # a .bin written by this project comes back byte-identical
    write_bin(tmp_path / "ours.bin", images, issame)
    assert bin_tool.main(["unpack", str(tmp_path / "ours.bin"), str(tmp_path / "f2")]) == 0
    assert bin_tool.main(["pack", str(tmp_path / "f2"), str(tmp_path / "ours2.bin")]) == 0
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ours2.bin").read_bytes()


@pytest.mark.parametrize("pairs, message", [
    ("a.jpg b.jpg yes\n", r"pairs.txt:1: expected '<image A> <image B> <0\|1>'"),
    ("a.jpg missing.jpg 1\n", r"pairs.txt:1: image missing.jpg not found"),
    ("\n", r"lists no pairs"),
    ("a.jpg junk.jpg 0\n", r"junk.jpg: not a decodable image"),
])
def test_bin_pack_bad_folder(pairs, message, tmp_path, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_image(1))
    (folder / "b.jpg").write_bytes(_image(2))
    (folder / "junk.jpg").write_bytes(b"junk")
    (folder / "pairs.txt").write_text(pairs)
    assert bin_tool.main(["pack", str(folder), str(tmp_path / "x.bin")]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.bin").exists()


def test_tools_refuse_to_overwrite_without_force(shared_fixtures, tmp_path, capsys):
    src = shared_fixtures / "mxnet_written"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    (out / "train.rec").write_text("mine")
    write_bin(tmp_path / "s.bin", [_image(1), _image(2)], [True])
    calls = [(rec2images.main, [str(src), str(out)]), (images2rec.main, [str(tmp_path), str(out)]),
             (bin_tool.main, ["unpack", str(tmp_path / "s.bin"), str(out)]),
             (bin_tool.main, ["pack", str(tmp_path), str(out / "train.rec")])]
    for main, args in calls:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep").read_text() == "mine" and (out / "train.rec").read_text() == "mine"
    assert rec2images.main([str(src), str(out), "--force"]) == 0
    assert not (out / "keep").exists() and len((out / "label.txt").read_text().splitlines()) == 60


def test_check_dataset_good_and_bad(shared_fixtures, tmp_path, capsys):
    src = shared_fixtures / "mxnet_written"
    assert check_dataset.main([str(src)]) == 0
    out = capsys.readouterr().out
    assert "60 images, 12 identities" in out and "5-9: 12" in out and out.rstrip().endswith("OK")
    # wrong class count: labels beyond it, and identities that have no image
    assert check_dataset.main([str(src), "--num-classes", "10"]) == 1
    assert "label out of range: key 51: label 10 not in [0, 10)" in capsys.readouterr().out
    assert check_dataset.main([str(src), "--num-classes", "13"]) == 1
    assert "identities without images: label 12" in capsys.readouterr().out
    # a cut-off download
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "train.idx").write_bytes((src / "train.idx").read_bytes())
    (cut / "train.rec").write_bytes((src / "train.rec").read_bytes()[:200_000])
    assert check_dataset.main([str(cut)]) == 1
    assert "PROBLEM cannot open" in capsys.readouterr().out
    # a corrupt image in a folder
    rec2images.rec_to_images(src, tmp_path / "img", progress=False)
    (tmp_path / "img" / "images" / "3" / "17.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert check_dataset.main([str(tmp_path / "img")]) == 1
    assert "PROBLEM undecodable: images/3/17.jpg" in capsys.readouterr().out
    assert check_dataset.main([str(tmp_path / "img"), "--no-decode"]) == 0


@pytest.mark.parametrize("labels, message", [
    ([0, 0, 2], r"sample 2: label 2 breaks the order"),
    ([0, 1, 0], r"sample 2: label 0 breaks the order"),
    ([1, 1], r"sample 0: label 1 breaks the order"),
    ([], r"no images to write"),
])
def test_write_insightface_rec_rejects_bad_labels_and_keeps_old_files(labels, message, tmp_path):
    from mxnet_reader.insightface import write_insightface_rec

    write_insightface_rec(tmp_path, [(0, _image(1)), (1, _image(2))], progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=message):
        write_insightface_rec(tmp_path, [(label, _image(label)) for label in labels], progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, old set intact


def test_images2rec_and_check_dataset_read_a_notepad_label_file(tmp_path, capsys):
    """A UTF-8 BOM and CRLF (Windows Notepad): was `'\\ufeffa.jpg'` not found in images2rec."""
    src = tmp_path / "listed"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(_image(i * 40))
    (src / "label.txt").write_bytes(b"\xef\xbb\xbf0.jpg\t0\r\n1.jpg\t1\r\n2.jpg\t99999999999\r\n")
    assert images2rec.main([str(src), str(tmp_path / "out")]) == 0  # any labels: images2rec renumbers them
    assert json.loads((tmp_path / "out" / "label_map.json").read_text())["labels"] == {
        "0": 0, "1": 1, "2": 99999999999}
    capsys.readouterr()
    assert check_dataset.main([str(src)]) == 1  # training would infer 10^11 classes from it
    out = capsys.readouterr().out
    assert "PROBLEM cannot open" in out and "line 3: label 99999999999 would make 100000000000 classes" in out
    (src / "label.txt").write_bytes(b"\xef\xbb\xbf0.jpg\t0\r\n1.jpg\t1\r\n2.jpg\t1\r\n")
    assert check_dataset.main([str(src)]) == 0
    assert "3 images, 2 identities" in capsys.readouterr().out


def test_check_dataset_sizes_nothing_by_a_huge_num_classes(shared_fixtures, capsys):
    """Was: `Unable to allocate 745 GiB` (a bincount of num_classes entries)."""
    assert check_dataset.main([str(shared_fixtures / "mxnet_written"), "--num-classes", "99999999999"]) == 1
    out = capsys.readouterr().out
    assert "identities without images: label 12" in out
    assert "identities without images: ... and 99999999977 more (99999999987 in all)" in out


def test_gallery_reads_label_txt_with_the_one_label_file_reader(tmp_path):
    """tools/gallery.py parsed label.txt itself: a byte-order mark became part of the first image name."""
    from tools.gallery import gallery_labels

    (tmp_path / "label.txt").write_bytes(b"\xef\xbb\xbfa.jpg\tann\r\nsub dir/b.jpg bob\r\n\r\n")
    assert gallery_labels(tmp_path) == (["a.jpg", "sub dir/b.jpg"], ["ann", "bob"])
    (tmp_path / "label.txt").write_text("a.jpg\n")
    with pytest.raises(ValueError, match=r"label\.txt: line 1 is not 'path<TAB>label'"):
        gallery_labels(tmp_path)
