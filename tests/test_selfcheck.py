"""tools/selfcheck.py: `--quick` passes on this machine (CI), results and exit status, and checks that catch faults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backbones import layers
from deploy.embedder import gpu_missing
from tests.launch import ROOT
from tools import selfcheck

CPU_CHECKS = {"backbone", "backbone_nhwc", "backbone_to_static", "head", "train", "data", "export"}
GPU_CHECKS = {"backbone_amp", "head_fused", "export_gpu", "export_tensorrt_fp16"}


@pytest.mark.slow
def test_quick_selfcheck_passes_here(tmp_path: Path) -> None:
    """What CI runs. On a CPU machine every GPU check is skipped with the reason, the rest pass."""
    report_file = tmp_path / "selfcheck.json"
    proc = subprocess.run([sys.executable, "tools/selfcheck.py", "--quick", "--json", str(report_file)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert set(status) == set(selfcheck.CHECKS)
    assert all(status[name] == "pass" for name in CPU_CHECKS), report["checks"]
    assert report["environment"]["paddle"] and report["quick"] is True
    for check in report["checks"]:
        assert check.get("detail" if check["status"] != "skip" else "reason")
    if gpu_missing() is not None:
        reason = gpu_missing()
        assert all(status[name] == "skip" for name in GPU_CHECKS)
        assert all(reason in c["reason"] for c in report["checks"] if c["name"] in GPU_CHECKS)
    table = proc.stdout.splitlines()
    assert any(line.startswith("backbone ") and " pass " in line for line in table)
    assert "train.py" not in proc.stdout and "step 20/20" not in proc.stdout  # train.py's own log stays inside


@pytest.mark.slow
@pytest.mark.dist
def test_two_rank_gradient_check_runs_on_gloo(tmp_path: Path) -> None:
    """The multi-GPU check's code, on 2 CPU ranks: DataParallel + Partial FC gradients == one rank's."""
    report_file = tmp_path / "dist.json"
    proc = subprocess.run([sys.executable, "tools/selfcheck.py", "--only", "dist_2rank", "--json", str(report_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (check,) = json.loads(report_file.read_text())["checks"]
    assert check["status"] == "pass" and "2 ranks vs 1" in check["detail"], check


def test_a_failure_sets_the_exit_status_and_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    def wrong(m: selfcheck.Machine) -> str:
        raise selfcheck.Failed("2 != 1")

    def crash(m: selfcheck.Machine) -> str:
        raise KeyError("boom")

    def absent(m: selfcheck.Machine) -> str:
        raise selfcheck.Skip("no such device")

    monkeypatch.setattr(selfcheck, "CHECKS", {"ok": lambda m: "fine", "wrong": wrong, "crash": crash, "absent": absent})
    assert selfcheck.main(["--json", str(tmp_path / "r.json")]) == 1
    checks = {c["name"]: c for c in json.loads((tmp_path / "r.json").read_text())["checks"]}
    assert [checks[n]["status"] for n in ("ok", "wrong", "crash", "absent")] == ["pass", "fail", "fail", "skip"]
    assert checks["wrong"]["detail"] == "2 != 1" and checks["absent"]["reason"] == "no such device"
    assert checks["crash"]["detail"].startswith("KeyError: 'boom' (test_selfcheck.py:")
    assert "1 passed, 2 failed, 1 skipped" in capsys.readouterr().out
    assert selfcheck.main(["--only", "ok"]) == 0


def test_unknown_check_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        selfcheck.main(["--only", "backbone,gpu_magic"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown check gpu_magic" in err[0]


def test_nhwc_check_catches_a_prelu_on_the_wrong_axis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A silent layout fault (NHWC PReLU slopes applied to the wrong channels) fails the check."""
    real_slope = layers._slope
    monkeypatch.setattr(layers, "_slope", lambda weight, ndim, channels_last: real_slope(weight, ndim, channels_last)
                        [::-1] if channels_last else real_slope(weight, ndim, channels_last))
    machine = selfcheck.Machine(quick=True, work=tmp_path, gpus=0, gpu_reason="test")
    with pytest.raises(selfcheck.Failed, match="NHWC differs from NCHW"):
        selfcheck.check_backbone_nhwc(machine)
