"""Check this machine before training: the devices, and each part of the project that can run here.

    python tools/selfcheck.py                  # about a minute; prints a table, exit status 1 if any check fails
    python tools/selfcheck.py --quick          # smaller and fewer repeats (CI, under 30 s on 2 idle cores)
    python tools/selfcheck.py --json selfcheck.json --only head,train

Each check passes, fails (with what differed) or is skipped (with why: e.g. no GPU). On a GPU machine the GPU-only
code runs here first: AMP fp16, NHWC and to_static on cuDNN, the fused Partial FC kernels, NCCL across 2 GPUs,
Paddle Inference on CUDA/TensorRT and ONNX Runtime's CUDA provider. docs/gpu_first_run.md explains each check,
what a failure means and what to send in a bug report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__":  # run as a program: Paddle's log level is read when it is imported (below)
    from utils.cli import start_program
    start_program()

import paddle

from deploy.embedder import gpu_missing
from tools.selfcheck_deploy import (
    check_data,
    check_export,
    check_export_gpu,
    check_export_onnx_cuda,
    check_export_tensorrt,
)
from tools.selfcheck_model import (
    Failed,
    Machine,
    Skip,
    check_backbone,
    check_backbone_amp,
    check_backbone_nhwc,
    check_backbone_to_static,
    check_dist_2rank,
    check_head,
    check_head_fused,
    check_train,
    dist_worker,
)
from utils.atomic import write_text_atomic
from utils.cli import check_writable, start_program


def environment() -> dict[str, Any]:
    """What this machine and its Paddle build are, for the report and for bug reports."""
    from paddle import inference

    cuda = paddle.device.is_compiled_with_cuda()
    gpus = paddle.device.cuda.device_count() if cuda else 0
    env = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "paddle": paddle.__version__, "paddle_commit": paddle.version.commit, "paddle_cuda_build": cuda,
        "cuda": paddle.version.cuda() if cuda else None, "cudnn": paddle.version.cudnn() if cuda else None,
        "tensorrt": ".".join(map(str, inference.get_trt_compile_version())) if cuda else None,
        "gpus": gpus, "gpu_names": [paddle.device.cuda.get_device_name(i) for i in range(gpus)],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for module in ("onnxruntime", "paddle2onnx", "cv2", "numpy"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


CHECKS: dict[str, Callable[[Machine], str]] = {
    "backbone": check_backbone, "backbone_nhwc": check_backbone_nhwc, "backbone_to_static": check_backbone_to_static,
    "backbone_amp": check_backbone_amp, "head": check_head, "head_fused": check_head_fused, "train": check_train,
    "dist_2rank": check_dist_2rank, "data": check_data, "export": check_export, "export_gpu": check_export_gpu,
    "export_tensorrt_fp16": check_export_tensorrt, "export_onnx_cuda": check_export_onnx_cuda,
}


def run_check(name: str, m: Machine) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = {"name": name, "status": "pass", "detail": CHECKS[name](m)}
    except Skip as e:
        result = {"name": name, "status": "skip", "reason": str(e)}
    except Failed as e:
        result = {"name": name, "status": "fail", "detail": str(e)}
    except Exception as e:  # a crash is a failure of the check, reported with where it happened
        where = traceback.extract_tb(e.__traceback__)[-1]
        result = {"name": name, "status": "fail",
                  "detail": f"{type(e).__name__}: {str(e).strip()[:300]} ({Path(where.filename).name}:{where.lineno})"}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    width = max(len(r["name"]) for r in results)
    print(f"{'check':<{width}}  {'status':<6}  {'s':>5}  figure / reason")
    for r in results:
        print(f"{r['name']:<{width}}  {r['status']:<6}  {r['seconds']:>5.1f}  {r.get('detail') or r.get('reason')}")


def main(argv: list[str] | None = None) -> int:
    start_program()  # as a program it ran before the imports; here for a call from Python
    warnings.filterwarnings("ignore", message="Tensor do not have 'place'")  # to_static's backward builder
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (CI)")
    parser.add_argument("--only", help=f"comma-separated checks to run (of {', '.join(CHECKS)})")
    parser.add_argument("--dist-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dist_worker:
        return dist_worker(args.dist_worker)
    names = list(CHECKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        parser.exit(2, f"{parser.prog}: error: --only: unknown check {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(CHECKS)}\n")
    if args.json is not None:
        try:
            check_writable(args.json)
        except OSError as e:
            parser.exit(2, f"{parser.prog}: error: --json: {e}\n")

    started = time.perf_counter()
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu_names"))
    gpu_reason = gpu_missing()
    paddle.set_device("cpu" if gpu_reason else "gpu")
    work = Path(tempfile.mkdtemp(prefix="arcface_selfcheck_"))
    try:
        machine = Machine(args.quick, work, 0 if gpu_reason else env["gpus"], gpu_reason)
        results = [run_check(name, machine) for name in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    total = time.perf_counter() - started
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {total:.0f} s")
    if args.json is not None:
        report = {"environment": env, "quick": args.quick, "seconds": round(total, 1), "checks": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
