"""Multi-node training as users start it on GPU machines: one `paddle.distributed.launch --nnodes 2` per node.

Here both "nodes" are processes on 127.0.0.1 with one CPU rank each (gloo). They must find each other through the
master address, train a few steps as one 2-rank job and save a 2-rank head (one shard per node) and one backbone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.launch import ROOT
from tests.test_train import losses, tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_node(rank: int, master: str, log_dir: Path, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "2", "--nproc_per_node", "1",
           "--master", master, "--rank", str(rank), "--log_dir", str(log_dir), "train.py", *args]
    env = {**os.environ, "GLOG_minloglevel": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_train_as_one_job(tmp_path: Path) -> None:
    args = tiny_args(tmp_path / "cache", tmp_path, "nodes", "--num_epoch", "5", "--stop_at_step", "3")
    master = f"127.0.0.1:{free_port()}"
    nodes = [launch_node(rank, master, tmp_path / f"log{rank}", args) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=240)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    logs = "\n".join([*outputs, *(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                                  for p in sorted(tmp_path.glob("log*/workerlog.*")))])
    assert [node.returncode for node in nodes] == [0, 0], logs
    run = tmp_path / "nodes"
    assert sorted(losses(run)) == [1, 2, 3]
    ckpt = run / "checkpoints" / "step_0000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_classes"] == 20
    for rank in (0, 1):  # each node wrote its own half of the centres
        assert np.load(ckpt / f"softmax_weight.r{rank}.npy").shape == (10, 64)
    assert (run / "model.pdparams").is_file()
    assert "rank 0 of 2" in (run / "train.log").read_text()
