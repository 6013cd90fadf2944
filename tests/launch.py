"""Run a script on several CPU ranks with Paddle's own launcher (gloo), with a hard timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(script: str | Path, *args: str, log_dir: Path, nproc: int = 2, timeout: float = 240,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m paddle.distributed.launch --nproc_per_node N script args` from the project root.

    Returns the completed process; its `.logs` attribute holds every worker's log text, for assertion messages.
    """
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(log_dir), str(script), *map(str, args)]
    full_env = {**os.environ, "GLOG_minloglevel": "2", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    logs = [f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(Path(log_dir).glob("workerlog.*"))]
    proc.logs = "\n".join([proc.stdout[-3000:], proc.stderr[-3000:], *logs])
    return proc
