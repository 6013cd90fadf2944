"""train.py on one process: exact resume, crash safety of checkpoints, fine-tuning, bad inputs, metrics and plots.

Everything runs on a tiny synthetic set (20 identities x 2 images: 5 batches of 8 per epoch, small enough for the
loss to fall within 20 steps), a quarter-width MobileFaceNet with 64-d embeddings and 1 thread: a run of 20 steps
takes a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

import train
from tests.launch import ROOT
from utils.checkpoint import LATEST
from utils.logger import LOGGER_NAME
from utils.safe_pickle import load_paddle_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic set, generated here: whichever test runs first sees no progress bar on its stderr."""
    from config import parse_args
    from dataset import prepare_dataset

    cache = tmp_path_factory.mktemp("synthetic_cache")
    prepare_dataset(parse_args(tiny_args(cache, cache, "unused")))
    return cache


def tiny_args(cache_dir: Path, output: Path, run_name: str, *extra: str) -> list[str]:
    return ["--cache_dir", str(cache_dir), "--synthetic_identities", "20", "--synthetic_images_per_id", "2",
            "--synthetic_val_pairs", "20", "--width", "0.25", "--embedding_size", "64", "--batch_size", "8",
            "--threads", "1", "--num_workers", "0", "--num_epoch", "4", "--log_every", "1", "--val_targets", "",
            "--val_at_start", "false", "--lr", "0.1", "--output", str(output), "--run_name", run_name, *extra]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run's later line for a step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """train.py in a fresh process (a real restart: nothing carried over in memory)."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def straight_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 steps (4 epochs) without interruption, with verification on synth_val before and after."""
    out = tmp_path_factory.mktemp("runs")
    assert train.main(tiny_args(cache_dir, out, "straight", "--val_targets", "synth_val", "--val_at_start", "true",
                                "--save_every", "10")) == 0
    return out / "straight"


def test_run_outputs(straight_run: Path) -> None:
    names = {p.name for p in straight_run.iterdir()}
    assert {"config.json", "train.log", "metrics.jsonl", "checkpoints", "model.pdparams",
            "best_synth_val.pdparams"} <= names
    assert not any(":" in p.name for p in straight_run.rglob("*"))
    if importlib.util.find_spec("visualdl") is not None:
        assert any((straight_run / "visualdl").iterdir())
    assert (straight_run / "checkpoints" / LATEST).read_text().strip() == "step_0000020"
    assert json.loads((straight_run / "config.json").read_text())["num_classes"] == 20
    log = (straight_run / "train.log").read_text()
    assert "accuracy before training: synth_val" in log and "accuracy after training (step 20)" in log
    assert "20 centres on rank 0" in log and "40 samples per epoch, 20 steps" in log
    records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert {"lr", "samples_per_s", "data_time", "step_time", "eta_s", "epoch"} <= set(steps[0])
    lrs = [r["lr"] for r in steps]  # polynomial decay from 0.1, no warm-up, 20 steps
    assert lrs == pytest.approx([0.1 * (1 - t / 20) for t in range(20)])
    vals = [r for r in records if "val/synth_val" in r]
    assert [r["step"] for r in vals] == [0, 20]
    # loss goes down: mean of the last 5 steps below the mean of the first 5
    assert np.mean([r["loss"] for r in steps[-5:]]) < np.mean([r["loss"] for r in steps[:5]])


def test_exact_resume_in_a_fresh_process(cache_dir: Path, straight_run: Path, tmp_path: Path) -> None:
    """7 steps (mid-epoch), stop, --resume in a new process to 20: losses of steps 8-20 equal the straight run's."""
    assert train.main(tiny_args(cache_dir, tmp_path, "resumed", "--stop_at_step", "7")) == 0
    assert (tmp_path / "resumed" / "checkpoints" / "step_0000007").is_dir()
    proc = run_cli(*tiny_args(cache_dir, tmp_path, "resumed", "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    expected, got = losses(straight_run), losses(tmp_path / "resumed")
    assert [got[s] for s in range(8, 21)] == pytest.approx([expected[s] for s in range(8, 21)], abs=1e-6)
    # the same weights at the end, too
    a = load_paddle_state(straight_run / "model.pdparams")
    b = load_paddle_state(tmp_path / "resumed" / "model.pdparams")
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def _complete(ckpt: Path) -> None:
    """Every file of a checkpoint loads (weights, optimizer, trainer state, rng, centre shards)."""
    assert load_paddle_state(ckpt / "backbone.pdparams")
    assert load_paddle_state(ckpt / "optimizer.pdopt")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == int(ckpt.name.split("_")[1])
    json.loads((ckpt / "rng.r0.json").read_text())
    json.loads((ckpt / "config.json").read_text())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["arrays"].values():
        assert np.load(ckpt / f"{name}.r0.npy", allow_pickle=False).shape == (20, 64)


def test_sigkill_while_checkpointing_leaves_latest_complete(cache_dir: Path, tmp_path: Path) -> None:
    """A checkpoint every step, each file followed by a short sleep; SIGKILL at random moments, resume, repeat."""
    rng = random.Random(0)
    args = tiny_args(cache_dir, tmp_path, "crash", "--save_every", "1", "--keep_checkpoints", "2")
    root = tmp_path / "crash" / "checkpoints"
    env = {"ARCFACE_CHECKPOINT_WRITE_DELAY": "0.03", "GLOG_minloglevel": "2"}
    last_step = 0
    for attempt in range(3):
        cmd = [sys.executable, "train.py", *args, *(["--resume"] if attempt else [])]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:  # wait for a new checkpoint, then kill somewhere in the next ones
                if (root / LATEST).is_file() and int((root / LATEST).read_text().split("_")[1]) > last_step:
                    break
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        name = (root / LATEST).read_text().strip()
        _complete(root / name)
        assert int(name.split("_")[1]) > last_step  # each resumed run made progress from the previous latest
        last_step = int(name.split("_")[1])
        # keep_checkpoints=2 (+1 if killed between the rename and the pruning)
        assert len(list(root.glob("step_*"))) <= 3


def test_init_backbone_starts_a_new_run_with_a_fresh_head(cache_dir: Path, straight_run: Path,
                                                           tmp_path: Path) -> None:
    """Fine-tuning: accuracy before training equals the source model's; any class count; a new run from step 0."""
    src = straight_run / "model.pdparams"
    assert train.main(tiny_args(cache_dir, tmp_path, "ft", "--init_backbone", str(src), "--num_classes", "37",
                                "--val_targets", "synth_val", "--val_at_start", "true", "--stop_at_step", "1")) == 0
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    source = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    before = next(r["val/synth_val"] for r in records if r["step"] == 0)
    after_source = next(r["val/synth_val"] for r in source if r["step"] == 20 and "val/synth_val" in r)
    assert before == after_source
    manifest = json.loads((tmp_path / "ft" / "checkpoints" / "step_0000001" / "manifest.json").read_text())
    assert manifest["num_classes"] == 37


def test_load_backbone_weights_rejects_another_architecture(straight_run: Path) -> None:
    from backbones import get_model, load_weights

    with pytest.raises(ValueError, match=r"not a r18 \(width 0.25, embedding 64\) state dict -- missing"):
        load_weights(get_model("r18", num_features=64, width=0.25), straight_run / "model.pdparams",
                     "r18 (width 0.25, embedding 64)")


@pytest.mark.parametrize(("extra", "message"), [
    (["--data", "/no/such/dataset"], "--data /no/such/dataset: no such file or directory"),
    (["--num_classes", "5"], "--num_classes 5 is smaller than the 20 classes found"),
    (["--init_backbone", "/no/such.pdparams"], "/no/such.pdparams: backbone weights not found"),
    (["--resume"], "--resume latest: no checkpoint found"),
])
def test_bad_inputs_fail_with_one_line(cache_dir: Path, tmp_path: Path, extra: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(tiny_args(cache_dir, tmp_path, "bad", *extra)) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and message in err, err


def test_checkpoint_of_another_network_is_refused(cache_dir: Path, straight_run: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = tiny_args(cache_dir, straight_run.parent, "straight", "--resume", "--network", "r18")
    assert train.main(args) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the config: network='mbf' (this run: 'r18')" in err, err


def test_fresh_start_over_an_existing_run_is_refused(cache_dir: Path, straight_run: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(tiny_args(cache_dir, straight_run.parent, "straight")) != 0
    assert "already holds checkpoints: add --resume" in capsys.readouterr().err


def test_cli_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in [(["--config", "nope"], "--config: unknown preset 'nope'"),
                          (["--no_such_key", "1"], "unrecognized arguments: --no_such_key 1"),
                          (["--data", ""], "--data: empty"),  # an unset shell variable: not the current directory
                          (["--run_name", ""], "--run_name: must name one directory inside --output"),
                          (["--run_name", "../x"], "--run_name: must name one directory inside --output")]:
        with pytest.raises(SystemExit) as exc:
            train.main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
    proc = run_cli("--batch_size", "big")  # the real entry point's exit status
    assert proc.returncode == 2 and proc.stderr.strip() == "train.py: error: --batch_size: expected int, got 'big'"


def test_nan_loss_stops_after_k_bad_steps_and_keeps_the_last_checkpoint(cache_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An absurd learning rate blows the weights up; the run stops with a clear message, checkpoints intact."""
    args = tiny_args(cache_dir, tmp_path, "nan", "--lr", "1e30", "--clip_grad_norm", "0", "--save_every", "1",
                     "--max_bad_steps", "3")
    assert train.main(args) != 0
    err = capsys.readouterr().err
    assert "batches in a row" in err and "last good checkpoint" in err, err
    root = tmp_path / "nan" / "checkpoints"
    _complete(root / (root / LATEST).read_text().strip())


def test_gradient_accumulation_steps_the_schedule_per_update(cache_dir: Path, tmp_path: Path) -> None:
    """gradient_acc 2: 20 batches make 10 optimizer steps, and the LR schedule spans those 10."""
    assert train.main(tiny_args(cache_dir, tmp_path, "acc", "--gradient_acc", "2")) == 0
    records = [json.loads(line) for line in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["lr"] for r in records] == pytest.approx([0.1 * (1 - t / 10) for t in range(10)])
    assert "10 steps of 16 samples" in (tmp_path / "acc" / "train.log").read_text()
    # An epoch (5 batches) ends inside steps 3 and 8: their loss is still the mean of both of their batches (measured
    # 36-50 over the 10 steps; a sum restarted with the epoch logged about half, 19-25, there).
    losses = [r["loss"] for r in records]
    assert min(losses) > 0.6 * max(losses), losses


def test_an_in_process_run_leaves_the_process_as_it_was(cache_dir: Path, tmp_path: Path) -> None:
    """Tests and benchmarks train in their own process: the training logger's handlers (and its open train.log),
    OpenCV's thread count, the device and the warning filters are as before the run."""
    log = logging.getLogger(LOGGER_NAME)

    def process_state() -> tuple:
        return log.handlers[:], log.level, log.propagate, cv2.getNumThreads(), paddle.get_device(), warnings.filters[:]

    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(3)  # not the 1 a run sets
    try:
        before = process_state()
        assert train.main(tiny_args(cache_dir, tmp_path, "clean", "--stop_at_step", "1")) == 0
        assert process_state() == before
    finally:
        cv2.setNumThreads(cv2_threads)


def test_plot_metrics(straight_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    cmd = [sys.executable, "tools/plot_metrics.py", str(straight_run), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists (use --force" in again.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "tools.plot_metrics", str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "metrics.jsonl:2: not a metrics record" in proc.stderr


def _snapshot(run_dir: Path) -> dict[str, tuple[str, int]]:
    """Every file of a run: content hash and modification time."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_from_another_runs_checkpoint_starts_a_new_run_and_leaves_that_run_alone(
        cache_dir: Path, straight_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume OTHER/checkpoints/step_N --run_name NEW: NEW continues exactly from step N; OTHER is only read."""
    before = _snapshot(straight_run)
    source = straight_run / "checkpoints" / "step_0000010"
    assert train.main(tiny_args(cache_dir, tmp_path, "branch", "--resume", str(source), "--stop_at_step", "12")) == 0
    assert _snapshot(straight_run) == before
    branch = tmp_path / "branch"
    assert (branch / "checkpoints" / LATEST).read_text().strip() == "step_0000012"
    assert json.loads((branch / "config.json").read_text())["run_name"] == "branch"
    expected, got = losses(straight_run), losses(branch)
    assert sorted(got) == [11, 12] and [got[11], got[12]] == pytest.approx([expected[11], expected[12]], abs=1e-6)
    # a run directory that has checkpoints of its own is not mixed with another run's history
    assert train.main(tiny_args(cache_dir, tmp_path, "branch", "--resume", str(source))) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a checkpoint of another run, and" in err and "give a new --run_name" in err, err
    assert _snapshot(straight_run) == before


def test_a_mistyped_resume_path_writes_nothing(cache_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "old" / "checkpoints" / "step_0000001"
    assert train.main(tiny_args(cache_dir, tmp_path, "new", "--resume", str(missing))) == 1
    assert f"--resume {missing}: no checkpoint found" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []


def test_a_second_training_into_a_run_in_use_is_refused(cache_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The run directory is locked while a run uses it; the lock dies with the process (SIGKILL leaves none)."""
    args = tiny_args(cache_dir, tmp_path, "busy", "--num_epoch", "400")
    first = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # training has started
            if " step 1/" in line:
                break
        assert train.main(tiny_args(cache_dir, tmp_path, "busy", "--stop_at_step", "1")) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"busy is in use by another training run (pid {first.pid})" in err, err
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert train.main(tiny_args(cache_dir, tmp_path, "busy", "--stop_at_step", "1")) == 0


def test_a_code_running_checkpoint_is_refused_in_one_line_naming_the_file(
        cache_dir: Path, straight_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    ckpt = tmp_path / "evil" / "checkpoints" / "step_0000010"
    shutil.copytree(straight_run / "checkpoints" / "step_0000010", ckpt)
    (ckpt / "backbone.pdparams").write_bytes(pickle.dumps({"conv1.weight": RunsCode()}))
    assert train.main(tiny_args(cache_dir, tmp_path, "evil", "--resume", str(ckpt))) == 1
    err = capsys.readouterr().err
    assert err == (f"train.py: error: {ckpt / 'backbone.pdparams'}: refusing to load global posix.system: "
                   f"not a plain data pickle (nothing from it was run)\n"), err
    assert not marker.exists()


@pytest.mark.parametrize(("delay", "workers"), [(0.0, 0), (0.2, 2), (0.4, 0)])
def test_ctrl_c_ends_training_with_one_line_and_status_130(cache_dir: Path, tmp_path: Path, delay: float,
                                                            workers: int) -> None:
    """Ctrl-C (SIGINT to the process group, loader workers included) at several moments of a step: one line.

    Without care, a KeyboardInterrupt raised inside the NumPy PReLU's backward (a PyLayer) reaches Python as
    Paddle's OSError "(External) ..." and printed as a training error.
    """
    args = tiny_args(cache_dir, tmp_path, "ctrl_c", "--num_epoch", "400", "--num_workers", str(workers))
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if " step 2/" in line:
                break
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    last = err.strip().splitlines()[-1]  # after the synthetic set's progress bar, when this test generated it
    assert proc.returncode == 130 and last == "train.py: interrupted; --resume continues from the last checkpoint", err
    assert "Traceback" not in err and "External" not in err, err
