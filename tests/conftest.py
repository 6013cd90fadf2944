"""Test-wide environment: quiet Paddle logs, fixed thread count, the shared read-only fixtures, and a guard that
fails any test leaving the process environment or Paddle's global state changed (tests must not depend on order).
"""

import os
import signal
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("PYTHONWARNINGS", "ignore:No ccache found")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Their imports edit os.environ (OMP_NUM_THREADS, LD_LIBRARY_PATH, CUSTOM_DEVICE_ROOT, KMP_*): done here, before the
# guard's first snapshot, instead of inside whichever test happens to import them first.
import cv2  # noqa: F401
import paddle
import pytest
import sklearn  # noqa: F401

from utils.cpu import prefer_avx2_mkl

# What every program's main() does first, done once for the whole session before any Paddle math: all tests and the
# processes they start then share one MKL kernel choice (MKL reads it at its first call), on AMD and Intel alike.
prefer_avx2_mkl()

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def _global_state() -> dict[str, object]:
    """What a test could change for the tests after it, cheap to read."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own, per phase
    return {"os.environ": environ, "cwd": os.getcwd(), "umask": _umask(),
            "SIGINT handler": signal.getsignal(signal.SIGINT),
            "paddle device": paddle.get_device(), "paddle dynamic mode": paddle.in_dynamic_mode(),
            "paddle default dtype": paddle.get_default_dtype(),
            "paddle flags": paddle.get_flags(["FLAGS_use_mkldnn", "FLAGS_check_nan_inf"])}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _diff(before: dict[str, object], after: dict[str, object]) -> list[str]:
    out = []
    for key in before:
        if before[key] == after[key]:
            continue
        if key == "os.environ":
            was, now = before[key], after[key]
            out += [f"os.environ[{k!r}]: {was.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
                    for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        else:
            out.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    return out


@pytest.fixture(autouse=True)
def _no_leaked_global_state() -> None:
    """Fail (at teardown) a test that leaves global state changed, and restore the environment for the next."""
    before = _global_state()
    yield
    changes = _diff(before, _global_state())
    if changes:
        for key in set(os.environ) - set(before["os.environ"]) - {"PYTEST_CURRENT_TEST"}:
            del os.environ[key]
        os.environ.update(before["os.environ"])
        os.chdir(before["cwd"])
        os.umask(before["umask"])
        signal.signal(signal.SIGINT, before["SIGINT handler"])
        pytest.fail("the test left global state changed (use monkeypatch / tmp_path): " + "; ".join(changes),
                    pytrace=False)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures` (read-only inputs written by real mxnet / InsightFace); skip if absent."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip("../shared/fixtures is not beside the project")
    return path
