"""What a run sets up before its first step and gives back after its last.

Tests and benchmarks train in their own process: the thread counts, the device and the logger's handlers are
restored when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import paddle

from config import Config, ConfigError
from dataset import build_dataloader, build_dataset, dataset_dir, prepare_dataset
from utils import checkpoint as ckpt_io
from utils.distributed import barrier
from utils.logger import LOGGER_NAME, setup_logger


def run_dir(cfg: Config) -> Path:
    """`output/run_name`, always: `--resume PATH` says where training starts from, never where it writes.

    A checkpoint of another run seeds a new run here; the run it came from is only read.
    """
    return Path(cfg.output) / cfg.run_name


@contextmanager
def process_settings(threads: int) -> Iterator[bool]:
    """Paddle's kernels on `threads` threads, OpenCV on one, the GPU if there is one (yields whether it is).

    The cores belong to Paddle's kernels; and an OpenCV thread pool alive in this process when DataLoader workers
    fork deadlocks them (its condition variables are copied mid-wait), so OpenCV stays single-threaded here.
    Paddle has no getter for its thread count: it goes back to its start-up value, FLAGS_paddle_num_threads.
    """
    cv2_threads, device = cv2.getNumThreads(), paddle.get_device()
    paddle.base.core.set_num_threads(threads)
    cv2.setNumThreads(1)
    on_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    paddle.set_device("gpu" if on_gpu else "cpu")
    try:
        yield on_gpu
    finally:
        paddle.set_device(device)
        cv2.setNumThreads(cv2_threads)
        paddle.base.core.set_num_threads(paddle.get_flags(["FLAGS_paddle_num_threads"])["FLAGS_paddle_num_threads"])


@contextmanager
def training_logger(directory: Path, rank: int) -> Iterator[logging.Logger]:
    """utils.logger's training logger for this run; its files closed and the handlers before it back at the end."""
    log = logging.getLogger(LOGGER_NAME)
    saved = log.handlers[:], log.level, log.propagate
    setup_logger(directory, rank)
    try:
        yield log
    finally:
        for handler in log.handlers:
            handler.close()
        log.handlers[:], log.propagate = saved[0], saved[2]
        log.setLevel(saved[1])


def prepare_run_dir(directory: Path, cfg: Config, rank: int, world: int) -> None:
    """Refuse to mix runs (checkpoints here without --resume, or another run's checkpoint into one that has its
    own); make the checkpoint folder and drop what an interrupted save left."""
    if rank == 0:
        has_checkpoints = any((directory / ckpt_io.CHECKPOINTS).glob("step_*"))
        if cfg.resume is None and has_checkpoints:
            raise ConfigError(f"{directory} already holds checkpoints: add --resume to continue that run, "
                              f"or --run_name NAME to start another")
        if cfg.resume is not None and has_checkpoints:
            ckpt = ckpt_io.resolve_checkpoint(cfg.resume, directory)
            if not ckpt.resolve().is_relative_to(directory.resolve()):
                raise ConfigError(f"--resume {cfg.resume}: a checkpoint of another run, and {directory} holds "
                                  f"checkpoints of its own; give a new --run_name to start a run from it")
        (directory / ckpt_io.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale(directory)
    barrier(world)


def build_data(cfg: Config, rank: int, world: int, log: logging.Logger) -> tuple[Config, Path, Any, Any]:
    """The config with num_classes resolved, the data directory, the training set and its loader.

    The synthetic set is generated once (rank 0) before the others read it.
    """
    if cfg.data != "synthetic" and not Path(cfg.data).exists():
        raise FileNotFoundError(f"--data {cfg.data}: no such file or directory")
    if rank == 0:
        prepare_dataset(cfg)
    barrier(world)
    data_dir = dataset_dir(cfg)
    dataset = build_dataset(cfg, train=True)
    found = dataset.num_classes
    if cfg.num_classes is None:
        cfg = cfg.replace(num_classes=found)
    elif cfg.num_classes < found:
        raise ConfigError(f"--num_classes {cfg.num_classes} is smaller than the {found} classes found in {data_dir}")
    if cfg.num_image is not None and cfg.num_image != len(dataset):
        log.warning("num_image is %d but %s holds %d images; using the dataset", cfg.num_image, data_dir,
                    len(dataset))
    return cfg, data_dir, dataset, build_dataloader(cfg, rank, world, dataset)
