"""The tools' user mistakes end in one `error:` line and a non-zero exit, before any work and with nothing written:
numeric options out of range, an output that cannot be written, a weights file that is a code-running pickle."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import eval.verification
from deploy.gallery import build_index
from eval import ijb
from paddle_pretrainedmodel import model_test
from tools import export, gallery, inference, recognize
from utils.cli import check_writable, finite_float, positive_int

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"gallery": gallery.main, "inference": inference.main, "recognize": recognize.main, "export": export.main,
         "model_test": model_test.main, "ijb": ijb.main}


def run(tool: str, args: list[str | Path], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit status and stderr of one tool run in this process."""
    try:
        code = TOOLS[tool]([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def command(tool: str, tmp: Path) -> list[str | Path]:
    """A complete command line of `tool` whose inputs need not exist (the parser or the first check stops it)."""
    model = ["--network", "mbf", "--weights", tmp / "w.pdparams"]
    return {"gallery": ["search", "--index", tmp / "i.npz", "--query", tmp / "q.png", *model],
            "inference": ["--input", tmp / "faces", "--output", tmp / "emb", *model],
            "recognize": ["--image", tmp / "p.png", "--index", tmp / "i.npz", "--out", tmp / "a.png", *model],
            "export": ["--output", tmp / "exported", *model],
            "model_test": ["--data", tmp, *model],
            "ijb": ["--data", tmp, "--target", "IJBC", "--out", tmp / "ijb", *model]}[tool]


@pytest.mark.parametrize(("tool", "option", "value", "wanted"), [
    ("gallery", "--top-k", "0", "a positive integer"),  # was an IndexError after embedding every query
    ("gallery", "--top-k", "-2", "a positive integer"),  # silently gave 2 results
    ("gallery", "--threshold", "nan", "a number in [-1, 1]"),  # nothing is ever >= nan: everyone 'unknown'
    ("gallery", "--threshold", "1.4", "a number in [-1, 1]"),  # a squared-L2 threshold given as a cosine
    ("gallery", "--det-threshold", "2", "a number in [0, 1]"),
    ("inference", "--batch-size", "0", "a positive integer"),  # was `range() arg 3 must not be zero`
    ("inference", "--threads", "-1", "a positive integer"),
    ("inference", "--width", "inf", "a number > 0"),
    ("inference", "--embedding-size", "0", "a positive integer"),
    ("recognize", "--top-k", "0", "a positive integer"),
    ("recognize", "--threshold", "nan", "a number in [-1, 1]"),
    ("recognize", "--det-threshold", "-0.1", "a number in [0, 1]"),
    ("export", "--tolerance", "nan", "a number > 0"),  # `not diff <= nan`: every export failed its parity check
    ("export", "--width", "0", "a number > 0"),
    ("export", "--embedding-size", "-512", "a positive integer"),
    ("model_test", "--batch-size", "0", "a positive integer"),
    ("model_test", "--width", "nan", "a number > 0"),
    ("ijb", "--batch-size", "0", "a positive integer"),
    ("ijb", "--workers", "0", "a positive integer"),
    ("ijb", "--embedding-size", "1.5", "a positive integer"),
])
def test_numeric_options_are_checked_at_the_parser(tool, option, value, wanted, tmp_path, capsys):
    code, err = run(tool, [*command(tool, tmp_path), option, value], capsys)
    assert code == 2 and err.splitlines()[-1].endswith(f"error: argument {option}: must be {wanted}, got {value!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_option_types():
    assert positive_int("3") == 3 and finite_float(-1, 1)("-1") == -1.0 and finite_float(0, low_open=True)("1e-9")
    for parse, text in ((positive_int, "0"), (positive_int, "2.0"), (positive_int, "x"), (finite_float(), "inf"),
                        (finite_float(0, 1), "1.0001"), (finite_float(0, low_open=True), "0"), (finite_float(), "")):
        with pytest.raises(Exception, match="must be") as info:
            parse(text)
        assert type(info.value).__name__ == "ArgumentTypeError"


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out.npz")  # folders still to be made: fine, and none is made
    check_writable(tmp_path / "new" / "run", folder=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file/out\.npz: cannot be written \(.*file is a file"):
        check_writable(tmp_path / "file" / "out.npz")
    with pytest.raises(NotADirectoryError, match="file: cannot write outputs into it"):
        check_writable(tmp_path / "file", folder=True)
    with pytest.raises(IsADirectoryError, match="a folder is in the way"):
        check_writable(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match=r"locked/sub/out\.npz: cannot be written \(.*locked: Permission"):
        check_writable(locked / "sub" / "out.npz")


@pytest.fixture
def inputs(tmp_path):
    """A face crop in an identity folder, a photo, its face list, a gallery index and a .bin set."""
    crop = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    (tmp_path / "people" / "alice").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "people" / "alice" / "0.png"), crop)
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.resize(crop, (300, 200)))
    (tmp_path / "faces.json").write_text('[{"box": [50, 20, 200, 170]}]')
    build_index(np.eye(2, 64, dtype=np.float32), ["alice", "bob"], ["", ""]).save(tmp_path / "index.npz")
    from eval.bin_io import write_bin

    png = cv2.imencode(".png", crop)[1].tobytes()
    (tmp_path / "sets").mkdir()
    write_bin(tmp_path / "sets" / "lfw.bin", [png] * 20, [True, False] * 5)
    return tmp_path


def tool_commands(tmp: Path, weights: Path, out: Path) -> dict[str, list[str | Path]]:
    """Each tool with real inputs, `weights` as the backbone and its output(s) at `out`."""
    model = ["--network", "mbf", "--width", "0.25", "--embedding-size", "64", "--weights", weights]
    return {
        "gallery build": ["build", "--images", tmp / "people", "--out", out / "index.npz", *model],
        "gallery search": ["search", "--index", tmp / "index.npz", "--query", tmp / "people", *model],
        "inference": ["--input", tmp / "people", "--output", out / "emb", *model],
        "recognize": ["--image", tmp / "photo.png", "--faces", tmp / "faces.json", "--index", tmp / "index.npz",
                      "--out", out / "annotated.png", *model],
        "export": ["--output", out / "exported", *model],
        "model_test": ["--data", tmp / "sets", "--targets", "lfw", "--output", out / "results.txt", *model],
        "ijb": ["--data", tmp / "IJBC", "--target", "IJBC", "--out", out / "ijb", *model],
    }


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("tool", ["gallery build", "gallery search", "inference", "recognize", "export",
                                  "model_test", "ijb"])
def test_code_running_weights_are_one_line(tool, inputs, capsys):
    marker = inputs / "pickle_code_ran"
    evil = inputs / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"conv1.conv.weight": _RunsCode(marker)}))
    out = inputs / "out"
    args = tool_commands(inputs, evil, out)[tool]
    code, err = run(tool.split()[0], args, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert f"{evil}: refusing to load global posix.system" in lines[0] and lines[0].startswith("error: ")
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("tool", ["model_test", "ijb"])
def test_code_running_weights_one_line_from_the_shell(tool, inputs):
    """As a user runs them: a fresh process, where importing paddle would add its own warning lines."""
    marker = inputs / "pickle_code_ran"
    evil = inputs / "evil.pdparams"
    evil.write_bytes(pickle.dumps({"conv1.conv.weight": _RunsCode(marker)}))
    program = {"model_test": [str(ROOT / "paddle_pretrainedmodel" / "model_test.py")], "ijb": ["-m", "eval.ijb"]}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "GLOG_minloglevel")}
    args = [str(a) for a in tool_commands(inputs, evil, inputs / "out")[tool]]
    result = subprocess.run([sys.executable, *program[tool], *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    (line,) = result.stderr.splitlines()
    assert result.returncode == 1 and line.startswith(f"error: {evil}: refusing to load global posix.system")
    assert not marker.exists()


def test_code_running_bin_set_is_one_line(inputs, capsys):
    marker = inputs / "pickle_code_ran"
    (inputs / "sets" / "lfw.bin").write_bytes(pickle.dumps((_RunsCode(marker), [True])))
    weights = inputs / "tiny.pdparams"
    import paddle

    from backbones import get_model

    paddle.save(get_model("mbf", width=0.25, num_features=64).state_dict(), str(weights))
    code, err = run("model_test", tool_commands(inputs, weights, inputs / "out")["model_test"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "lfw.bin: refusing to load global posix.system" in err and not marker.exists()


@pytest.mark.parametrize(("tool", "message", "first_step"), [
    ("gallery build", "blocker/index.npz: cannot be written", (gallery, "load_crops")),
    ("inference", "blocker/emb.npy: cannot be written", (inference, "load_crops")),
    ("recognize", "blocker/annotated.png: cannot be written", (recognize, "read_rgb")),
    ("export", "blocker: cannot write outputs into it", (export, "load_backbone")),  # built beside, then renamed
    ("model_test", "blocker/results.txt: cannot be written", (eval.verification, "load_bin")),  # after every set
    ("ijb", "blocker/ijb: cannot be written", (ijb, "read_meta")),  # embedded every face, then a traceback
])
def test_unwritable_output_is_refused_before_any_work(tool, message, first_step, inputs, monkeypatch, capsys):
    blocker = inputs / "blocker"  # a file where the output's folder should be: unwritable even for root
    blocker.write_text("not a folder")

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"{tool} started working before checking its output")

    monkeypatch.setattr(*first_step, must_not_run)
    code, err = run(tool.split()[0], tool_commands(inputs, inputs / "w.pdparams", blocker)[tool], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {inputs}") and message in lines[0] and "not a folder" in lines[0]
    assert blocker.read_text() == "not a folder"
