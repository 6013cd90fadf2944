"""Data-pipeline throughput: bare decoding vs. the training DataLoader with 1 and 2 workers.

    python bench/loader.py [--identities 500 --images-per-id 20 --batch-size 128 --repeats 3]

Everything reads the same JPEG payloads (the synthetic set's train.rec). Two ceilings, each one process
decoding payloads already in memory, in file order: bare `cv2.imdecode` (the issue's ceiling) and the loader's
own decoder, `utils.image.decode_or_none` (libjpeg-turbo through simplejpeg, the same pixels). The loader
figures are images/s through `dataset.build_dataloader` (record read, decode into the batch, mirroring,
hand-over of uint8 batch tensors, in the epoch's random order) over a whole epoch once its workers run (they
persist across epochs). The float32 network input is made by the training step (`dataset.to_model_input`: on a
GPU, device ops; its CPU cost is `model_input_cpu` in the breakdown, not part of the loader figures). CPU
microseconds per image (workers included; Linux /proc) are printed too. For comparison, `--skip-paddle` off
adds the first design: uint8 samples through paddle.io.DataLoader (fresh shared memory per batch, workers
forked per epoch, first two batches excluded). `cpu_us_per_img_in_process` times the steps without any
worker: both decoders, the record reads, a worker's whole job (`load_batch`), the training process's copy
out of a slot, and the CPU model-input conversion. Runs are interleaved; figures are
medians, and each repeat's ratios are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # a program: quiet Paddle before it is imported (importing this module sets nothing)
    from utils.cli import start_program

    start_program()

import cv2
import numpy as np
import paddle

from config import DEFAULTS
from dataset import (
    RecordIODataset,
    ShardedBatchSampler,
    build_dataloader,
    to_model_input,
)
from synthetic import ensure_synthetic
from utils.image import decode_or_none


def cpu_seconds() -> tuple[float, float]:
    """CPU time of (this process, its finished children): DataLoader workers exit after each epoch."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def decode_rate(payloads: list[bytes], decode: Callable[[bytes], object]) -> tuple[float, float, float]:
    """(images/s, CPU us/image, the same) of one decoder alone on in-memory payloads, in file order."""
    wall, cpu = time.perf_counter(), cpu_seconds()[0]
    for payload in payloads:
        decode(payload)
    wall, cpu = time.perf_counter() - wall, cpu_seconds()[0] - cpu
    return len(payloads) / wall, cpu / len(payloads) * 1e6, cpu / len(payloads) * 1e6


def ratios(numerators: list[tuple[float, ...]], denominators: list[tuple[float, ...]]) -> list[float]:
    """Rate ratios of each interleaved repeat."""
    return [round(a[0] / b[0], 3) for a, b in zip(numerators, denominators, strict=True)]


def cv2_imdecode(payload: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)


def breakdown(ds: RecordIODataset, payloads: list[bytes], batch_size: int) -> dict[str, float]:
    """CPU us/image of the loader's steps in this process, without workers: where each process's time goes."""
    n = len(payloads) - len(payloads) % batch_size
    images = np.empty((batch_size, 112, 112, 3), np.uint8)
    labels = np.empty(batch_size, np.int64)
    copy = np.empty_like(images)
    batch = paddle.to_tensor(images)
    batches = np.random.default_rng(0).permutation(n).reshape(-1, batch_size)  # random order, as in training
    steps = {  # each result is dropped at once, as a training loop drops its batches
        "cv2_imdecode": (cv2_imdecode, payloads[:n]),
        "decoder": (decode_or_none, payloads[:n]),
        "read_records": (ds.raw_payloads, batches),
        "worker_load_batch": (lambda b: ds.load_batch(b, 0, images, labels), batches),
        "main_copy_out": (lambda _: np.copyto(copy, images), batches),
        "model_input_cpu": (lambda _: to_model_input(batch), batches),  # the training step's, not the loader's
    }
    result = {}
    for name, (step, items) in steps.items():
        cpu = cpu_seconds()[0]
        for item in items:
            step(item)
        result[name] = round((cpu_seconds()[0] - cpu) / n * 1e6, 1)
    return result


class _PaddleSamples(paddle.io.Dataset):
    """The previous design's worker view of the dataset: (index, epoch) -> (uint8 HWC, label)."""

    def __init__(self, ds: RecordIODataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item: tuple[int, int]) -> tuple[np.ndarray, np.int64]:
        return self.ds.load_uint8(*item)


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a live process (Linux /proc): the loader's workers live as long as the loader."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_rate(ds: RecordIODataset, batch_size: int, workers: int, epoch: int) -> tuple[float, float, float]:
    """build_dataloader in steady state: (images/s, CPU us/image of all processes and of this one) over one
    epoch, after a few batches of the previous epoch have started the workers."""
    loader = build_dataloader(SimpleNamespace(batch_size=batch_size, num_workers=workers, seed=0), 0, 1, ds)
    loader.batch_sampler.set_epoch(epoch)
    for i, _ in enumerate(loader):  # start the workers, fill the spare batch arrays
        if i == 4:
            break
    loader.batch_sampler.set_epoch(epoch + 1)
    pids = loader.worker_pids()
    own, children = cpu_seconds()[0], sum(process_cpu_seconds(pid) for pid in pids)
    start = time.perf_counter()
    for _ in loader:
        pass
    wall = time.perf_counter() - start
    own, children = cpu_seconds()[0] - own, sum(process_cpu_seconds(pid) for pid in pids) - children
    loader.close()
    images = len(loader) * batch_size
    return images / wall, (own + children) / images * 1e6, own / images * 1e6


def paddle_loader_rate(ds: RecordIODataset, batch_size: int, workers: int) -> tuple[float, float, float]:
    """The previous design, for comparison: uint8 batches through paddle.io.DataLoader (workers forked for the
    epoch, as it was used), normalised here. (images/s from the third batch, CPU us/image all and this one)."""
    sampler = ShardedBatchSampler(len(ds), batch_size, seed=0)
    loader = paddle.io.DataLoader(_PaddleSamples(ds), places=paddle.CPUPlace(), batch_sampler=sampler,
                                  num_workers=workers)
    cpu = cpu_seconds()
    count, start = 0, None
    for i, (images, _) in enumerate(loader):
        to_model_input(images)
        if i == 1:
            start = time.perf_counter()
        elif i > 1:
            count += batch_size
    wall = time.perf_counter() - start
    own, children = (after - before for after, before in zip(cpu_seconds(), cpu, strict=True))
    images = len(sampler) * batch_size
    return count / wall, (own + children) / images * 1e6, own / images * 1e6


def main() -> None:
    from utils.cpu import prefer_avx2_mkl
    prefer_avx2_mkl()  # before any Paddle math (utils/cpu.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=DEFAULTS["cache_dir"])
    parser.add_argument("--identities", type=int, default=500)
    parser.add_argument("--images-per-id", type=int, default=20)
    parser.add_argument("--val-pairs", type=int, default=DEFAULTS["synthetic_val_pairs"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-paddle", action="store_true", help="leave out the paddle.io.DataLoader comparison")
    args = parser.parse_args()

    root = ensure_synthetic(args.cache_dir, args.identities, args.images_per_id, args.val_pairs, args.seed)
    ds = RecordIODataset(root, train=True, seed=args.seed)
    payloads = [bytes(p) for p in ds.raw_payloads(np.arange(len(ds)))]
    decode_rate(payloads[:256], cv2_imdecode)  # warm-up
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in (
        "ceiling", "decoder", "workers1", "workers2", "paddle_1")}
    for repeat in range(args.repeats):
        runs["ceiling"].append(decode_rate(payloads, cv2_imdecode))
        runs["decoder"].append(decode_rate(payloads, decode_or_none))
        runs["workers1"].append(loader_rate(ds, args.batch_size, 1, 2 * repeat))
        runs["workers2"].append(loader_rate(ds, args.batch_size, 2, 2 * repeat))
        if not args.skip_paddle:
            runs["paddle_1"].append(paddle_loader_rate(ds, args.batch_size, 1))
    runs = {name: values for name, values in runs.items() if values}
    rate = {name: float(np.median([r[0] for r in values])) for name, values in runs.items()}
    cpu = {name: float(np.median([r[1] for r in values])) for name, values in runs.items()}
    main_cpu = {name: float(np.median([r[2] for r in values])) for name, values in runs.items()}
    result = {
        "images": len(payloads), "batch_size": args.batch_size, "repeats": args.repeats,
        "ceiling_img_s": round(rate["ceiling"]), "decoder_img_s": round(rate["decoder"]),
        "workers1_img_s": round(rate["workers1"]), "workers2_img_s": round(rate["workers2"]),
        "paddle_dataloader_workers1_img_s": round(rate.get("paddle_1", 0)),
        "workers1_vs_ceiling": round(rate["workers1"] / rate["ceiling"], 3),
        "workers1_vs_decoder": round(rate["workers1"] / rate["decoder"], 3),
        "workers2_vs_workers1": round(rate["workers2"] / rate["workers1"], 3),
        "workers1_vs_ceiling_runs": ratios(runs["workers1"], runs["ceiling"]),
        "workers1_vs_decoder_runs": ratios(runs["workers1"], runs["decoder"]),
        "workers2_vs_workers1_runs": ratios(runs["workers2"], runs["workers1"]),
        "cpu_us_per_img": {name: round(value, 1) for name, value in cpu.items()},
        "workers1_cpu_us_per_img_worker_main": [round(cpu["workers1"] - main_cpu["workers1"], 1),
                                                round(main_cpu["workers1"], 1)],
        "cpu_us_per_img_in_process": breakdown(ds, payloads, args.batch_size),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'':<26}{'images/s':>10}{'CPU us/img':>12}")
    for name, label in (("ceiling", "cv2.imdecode (ceiling)"), ("decoder", "utils.image decoder"),
                        ("workers1", "DataLoader 1 worker"), ("workers2", "DataLoader 2 workers"),
                        ("paddle_1", "(paddle.io, 1 worker)")):
        if name in rate:
            print(f"{label:<26}{rate[name]:>10.0f}{cpu[name]:>12.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
