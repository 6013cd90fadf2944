"""Writing outputs and reading inputs safely: file modes from the umask, errors that name the file, run-directory
locks that die with their process, abandoned temp dirs cleaned and live ones kept, refused pickles naming the file,
and no environment change from importing the library.
"""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import ROOT
from utils import atomic, locks
from utils.safe_pickle import UnsafePickleError, load_paddle_state, restricted_load


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> int:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_temp_dirs_take_their_mode_from_the_umask(umask: int, tmp_path: Path) -> None:
    out = tmp_path / "model.pdparams"
    atomic.write_bytes_atomic(out, b"x")
    assert _mode(out) == 0o666 & ~umask
    with locks.locked_temp_dir(tmp_path / "set") as tmp:
        assert _mode(tmp) == 0o777 & ~umask
    assert _mode(atomic.temp_dir_beside(tmp_path / "export")) == 0o777 & ~umask  # exports, IJB sets


def test_data_tools_outputs_take_their_mode_from_the_umask(umask: int, tmp_path: Path) -> None:
    from tools._data import staged_dir  # rec2images, bin_tool, images2rec outputs

    with staged_dir(tmp_path / "images") as tmp:
        (tmp / "0.jpg").write_bytes(b"x")
    assert _mode(tmp_path / "images") == 0o777 & ~umask and _mode(tmp_path / "images" / "0.jpg") == 0o666 & ~umask


def test_synthetic_cache_takes_its_mode_from_the_umask(umask: int, tmp_path: Path) -> None:
    from synthetic import ensure_synthetic

    path = ensure_synthetic(tmp_path, 2, 1, 4, seed=0)
    assert _mode(path) == 0o777 & ~umask
    assert {p.name: _mode(p) for p in path.iterdir()} == {p.name: 0o666 & ~umask for p in path.iterdir()}


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    """A real kernel error without a file name (EFBIG past RLIMIT_FSIZE, as ENOSPC on a full disk) names the file."""
    out = tmp_path / "index.npz"
    out.write_bytes(b"old")
    code = ("import resource, signal, sys; from utils.atomic import write_bytes_atomic; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
            "write_bytes_atomic(sys.argv[1], bytes(5000))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last == f"OSError: [Errno 27] File too large: '{out}'", proc.stderr
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["index.npz"]


def test_a_failed_synthetic_generation_names_the_set_and_leaves_nothing(tmp_path: Path) -> None:
    code = ("import resource, signal, sys; from synthetic import ensure_synthetic; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "ensure_synthetic(sys.argv[1], 20, 4, 20, seed=0)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    from synthetic import cache_name

    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"OSError: [Errno 27] File too large: '{tmp_path / cache_name(20, 4, 20, 0)}'", proc.stderr
    assert os.listdir(tmp_path) == []


def test_errors_about_other_files_pass_unchanged(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info, atomic.atomic_output(tmp_path / "out.txt"):
        (tmp_path / "missing-input.txt").read_bytes()
    assert info.value.filename == str(tmp_path / "missing-input.txt")
    with pytest.raises(FileNotFoundError, match=r"no/such/dir/out\.txt"):
        atomic.write_text_atomic(tmp_path / "no" / "such" / "dir" / "out.txt", "x")


def _hold_in_child(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from utils.locks import hold_run_dir\n"
            "with hold_run_dir(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_run_dir_is_held_by_one_process_and_freed_when_it_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = _hold_in_child(run_dir)
    try:
        refused = rf"^{run_dir} is in use by another training run \(pid {child.pid}\)"
        with pytest.raises(locks.RunDirInUseError, match=refused), locks.hold_run_dir(run_dir):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with (locks.hold_run_dir(run_dir),  # a killed holder leaves no stale lock
          pytest.raises(locks.RunDirInUseError, match=rf"\(pid {os.getpid()}\)"),  # one holder, even in-process
          locks.hold_run_dir(run_dir)):
        pass
    with locks.hold_run_dir(run_dir):  # released at the end of the block
        pass


def _make_temp_dir_in_child(final: Path, *, hold: bool) -> tuple[subprocess.Popen, Path]:
    """A process creating a locked temp dir for `final`; it stays alive (hold) or is SIGKILLed mid-way."""
    code = ("import sys, time; from pathlib import Path; from utils.locks import locked_temp_dir\n"
            "with locked_temp_dir(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'train.rec').write_bytes(b'half'); print(tmp, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(final)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    tmp = Path(child.stdout.readline().strip())
    if not hold:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return child, tmp


def test_only_abandoned_temp_dirs_are_removed(tmp_path: Path) -> None:
    final = tmp_path / "synthetic-v1-i2"
    live, live_tmp = _make_temp_dir_in_child(final, hold=True)
    try:
        _, dead_tmp = _make_temp_dir_in_child(final, hold=False)
        other = tmp_path / ".synthetic-v1-i2.tmp-user"  # matches the pattern but is a fresh dir of someone else's
        other.mkdir()
        assert locks.remove_abandoned(tmp_path, "synthetic-*") == []  # all younger than a minute: nothing proven
        old = time.time() - 120
        for path in (live_tmp, dead_tmp):
            os.utime(path, (old, old))
        assert locks.remove_abandoned(tmp_path, "synthetic-*") == [dead_tmp]
        assert live_tmp.is_dir() and (live_tmp / "train.rec").read_bytes() == b"half" and other.is_dir()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()


def test_synthetic_generation_removes_a_killed_generators_temp_dir(tmp_path: Path) -> None:
    from synthetic import cache_name, ensure_synthetic

    final = tmp_path / cache_name(2, 1, 4, 0)
    _, dead_tmp = _make_temp_dir_in_child(tmp_path / cache_name(50, 20, 100, 0), hold=False)  # another set's
    old = time.time() - 3600
    os.utime(dead_tmp, (old, old))
    assert ensure_synthetic(tmp_path, 2, 1, 4, seed=0) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


class _RunsCode:
    def __reduce__(self) -> tuple:
        return os.system, ("true",)


def test_a_refused_pickle_names_the_file_and_what_was_refused(tmp_path: Path) -> None:
    evil = tmp_path / "model.pdparams"
    evil.write_bytes(pickle.dumps({"w": _RunsCode()}))
    pattern = rf"^{evil}: refusing to load global (posix|os)\.system"
    for load in (restricted_load, load_paddle_state):
        with pytest.raises(UnsafePickleError, match=pattern):
            load(evil)
    assert issubclass(UnsafePickleError, ValueError)  # callers' "bad input: one line" handlers catch it


def test_importing_the_library_leaves_the_environment_alone() -> None:
    """Only programs' main() ask for MKL's AVX2 kernels (utils/cpu.py): an import must not change os.environ."""
    code = ("import os, cv2, paddle, sklearn; before = dict(os.environ); import backbones, train, utils.checkpoint; "
            "print(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))")
    env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_the_suite_guard_fails_a_test_that_leaks_environment(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text("import os\n\ndef test_leaks():\n    os.environ['LEAKY'] = '1'\n\n"
                                            "def test_next():\n    assert 'LEAKY' not in os.environ\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_leaky.py")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "2 passed, 1 error" in proc.stdout and "os.environ['LEAKY']: '(unset)' -> '1'" in proc.stdout, proc.stdout
