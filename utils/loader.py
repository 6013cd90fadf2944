"""The training loader: worker processes fill shared-memory batch slots, the training process hands each batch to
the device (`FaceDataLoader`), and `to_model_input` makes the network input of a batch.

The loader knows nothing about files or images: its dataset is any `BatchSource` (dataset.FaceDataset is one),
whose `load_batch` fills uint8 NxHxWx3 RGB images and int64 labels in place. The order and epoch of every batch
come from the sampler (utils.sampler); host arrays lent to tensors come from utils.host_buffers.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import Any, Protocol

import numpy as np
import paddle

from utils.host_buffers import HostBufferPool, lend
from utils.image import INPUT_SIZE, preprocess_batch
from utils.sampler import ShardedBatchSampler

_IMAGE_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)
MODEL_INPUT_BUFFERS = HostBufferPool()  # the float32 network inputs of to_model_input, recycled across steps


class BatchSource(Protocol):
    """What the loader and its workers need of a dataset."""

    def __len__(self) -> int: ...

    def load_batch(self, indices: np.ndarray, epoch: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Samples `indices` as uint8 RGB into images[:n] and int64 into labels[:n], flipped as `epoch` says."""


class FaceDataLoader:
    """The training batches of one rank, `len()` per epoch: (uint8 [B,112,112,3] RGB, int64 [B]) paddle Tensors on
    the training device; `to_model_input` makes the float32 network input of a batch.

    Worker processes (forked once, on the first iteration, and kept) read a batch's records, decode each JPEG
    straight into a shared-memory batch slot (allocated before the fork) and mirror it there. On the CPU the
    training process lends the slot itself to the batch tensor and gives it back to the workers when Paddle
    frees the tensor (if the training loop keeps old batches, so that no other slot is left, it copies
    instead); on a GPU it copies the slot to the device and gives it back at once. Nothing is mapped, pickled
    or copied per batch on the host: Paddle's DataLoader maps fresh shared memory for every batch, and its page
    faults cost more than the decoding here (bench/RESULTS.md).
    Batch k goes to worker k % num_workers, so batches arrive in sampler order whatever the worker count;
    each worker has `prefetch_per_worker` batches in flight plus the one the training loop holds.
    A worker that dies or stops answering for `timeout` seconds is an error here, never a hang; `close()`
    (or garbage collection, or interpreter exit) stops the workers. `start_method` is how workers start: fork
    on Linux (each starts in milliseconds), else spawn (Windows; macOS, where fork is unsafe): a spawned
    worker imports this module (and Paddle, ~3 s) and receives the dataset pickled (the RecordIO reader maps the
    file anew); the slots are then named shared memory instead of an anonymous map.
    """

    def __init__(self, dataset: BatchSource, batch_sampler: ShardedBatchSampler, num_workers: int = 0,
                 prefetch_per_worker: int = 2, timeout: float = 120.0, start_method: str | None = None) -> None:
        self.dataset, self.batch_sampler, self.num_workers = dataset, batch_sampler, num_workers
        self.prefetch_per_worker, self.timeout = prefetch_per_worker, timeout
        methods = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        if self.start_method not in methods:
            raise ValueError(f"start_method {self.start_method!r} is not available here ({', '.join(methods)})")
        self._pool: _WorkerPool | None = None
        self._buffers = HostBufferPool()  # uint8 batches without workers, copies of kept slots

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[paddle.Tensor, paddle.Tensor]]:
        on_gpu = paddle.device.get_device().startswith("gpu")
        uint8_batches = self._worker_batches() if self.num_workers > 0 else self._local_batches()
        for images, labels, release, lendable in uint8_batches:
            labels = paddle.to_tensor(labels)
            if lendable and not on_gpu:
                images = lend(images, release)  # no copy: the memory goes back once the tensor is freed
            else:
                images = paddle.to_tensor(images) if on_gpu else self._buffers.copy(images)
                release()
            self.batch_sampler.mark_consumed()
            yield images, labels

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (none before the first iteration or after close())."""
        return [process.pid for process in self._pool.processes] if self._pool is not None else []

    def close(self) -> None:
        """Stop the workers (a later iteration starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _local_batches(self):
        """(images, labels, release, lendable) of each batch, loaded in this process into a recycled array."""
        size = self.batch_sampler.batch_size
        labels = np.empty(size, dtype=np.int64)
        for batch in self.batch_sampler:
            images = self._buffers.take((size, *_IMAGE_SHAPE), np.uint8)
            self.dataset.load_batch(np.array([i for i, _ in batch]), batch[0][1], images, labels)
            yield images, labels, functools.partial(self._buffers.give_back, images), True

    def _worker_batches(self):
        """(images, labels, release, lendable) of each batch, in a shared-memory slot that `release()` gives back
        to the workers. A slot may be lent to the training loop while other slots keep the workers busy;
        `lendable` is False when the loop already holds every other one (it keeps old batches): copy it then."""
        if self._pool is None or not self._pool.close.alive:
            self._pool = _WorkerPool(self.dataset, self.batch_sampler.batch_size, self.num_workers,
                                     self.prefetch_per_worker + 1, self.timeout, self.start_method)
        pool = self._pool
        generation = pool.restart()  # waits out what an abandoned iteration left in flight
        batches = iter(self.batch_sampler)
        free = pool.free
        while True:
            while free and pool.submit(next(batches, None)):  # every free slot gets the next batch
                pass
            if not pool.in_flight:
                return
            slot = pool.receive()
            lendable = bool(free or pool.in_flight)  # other slots keep the workers busy while the loop holds it
            yield pool.images[slot], pool.labels[slot], functools.partial(free.append, slot), lendable
            if pool.generation != generation:
                raise RuntimeError("this loader iterator was abandoned: a newer iteration started")


def to_model_input(images: paddle.Tensor) -> paddle.Tensor:
    """A loader batch, uint8 [N,H,W,3] RGB, as the network's input: float32 [N,3,H,W] with exactly the values of
    utils.image.preprocess, on the batch's device.

    On a GPU these are Paddle ops. On the CPU, utils.image.preprocess_batch into a recycled array: Paddle's CPU
    kernels take 0.3-0.5 ms per image for the same.
    """
    if not images.place.is_cpu_place():
        return _normalise_with_paddle_ops(images)
    batch = np.from_dlpack(images)
    n, height, width, channels = batch.shape
    out = MODEL_INPUT_BUFFERS.take((n, channels, height, width), np.float32)
    return MODEL_INPUT_BUFFERS.lend(preprocess_batch(batch, out=out))


def _normalise_with_paddle_ops(images: paddle.Tensor) -> paddle.Tensor:
    """to_model_input on an accelerator: preprocess's float32 arithmetic, `(x / 255 - 0.5) / 0.5`."""
    x = images.astype("float32").transpose([0, 3, 1, 2])
    return (x / 255.0 - 0.5) / 0.5


class _SharedMemory(shared_memory.SharedMemory):
    """A SharedMemory whose views may outlive it (the slot arrays, batches lent to tensors): closing it then
    fails with BufferError, which is expected; the pages go with the last view (its descriptor at exit)."""

    def __del__(self) -> None:
        with contextlib.suppress(BufferError, OSError):
            self.close()


class _Slots:
    """The batch slots: uint8 images [slot, B, H, W, 3] and int64 labels [slot, B] in one block of memory shared
    with the workers. Under fork an anonymous map that forked workers inherit; under spawn a named
    SharedMemory, and pickling a _Slots sends its name (a spawned worker attaches), never its contents."""

    def __init__(self, num_slots: int, batch_size: int, named: bool) -> None:
        self._layout = (num_slots, batch_size)
        size = num_slots * batch_size * (INPUT_SIZE * INPUT_SIZE * 3 + 8)
        self._shared = _SharedMemory(create=True, size=size) if named else None
        self._view(self._shared.buf if named else mmap.mmap(-1, size))
        self.images.fill(0)  # fault every page in now, not during the first batches

    def _view(self, memory: Any) -> None:
        num_slots, batch_size = self._layout
        image_bytes = num_slots * batch_size * INPUT_SIZE * INPUT_SIZE * 3
        self.images = np.frombuffer(memory, np.uint8, image_bytes).reshape(
            num_slots, batch_size, INPUT_SIZE, INPUT_SIZE, 3)
        self.labels = np.frombuffer(memory, np.int64, num_slots * batch_size, image_bytes).reshape(
            num_slots, batch_size)

    def __getstate__(self) -> dict:
        if self._shared is None:
            raise TypeError("anonymous slots are inherited by forked workers, not pickled")
        return {"name": self._shared.name, "layout": self._layout}

    def __setstate__(self, state: dict) -> None:
        self._layout = state["layout"]
        self._shared = _SharedMemory(name=state["name"])
        self._view(self._shared.buf)

    def release(self) -> None:
        """Remove the name of named memory (the pages go with the last mapping: lent batches keep theirs)."""
        if self._shared is not None:
            with contextlib.suppress(FileNotFoundError):
                self._shared.unlink()


class _WorkerPool:
    """Worker processes and the shared-memory slots they fill; see FaceDataLoader."""

    def __init__(self, dataset: BatchSource, batch_size: int, num_workers: int, slots_per_worker: int,
                 timeout: float, start_method: str) -> None:
        self.num_workers, self.num_slots, self.timeout = num_workers, num_workers * slots_per_worker, timeout
        self.slots = slots = _Slots(self.num_slots, batch_size, named=start_method != "fork")
        self.images, self.labels = slots.images, slots.labels
        self.free = collections.deque(range(self.num_slots))  # slots neither in flight nor held by the loader
        self.generation, self.submitted, self.in_flight = 0, 0, 0
        context = multiprocessing.get_context(start_method)
        self._connections, self._processes = [], []
        self.close = weakref.finalize(self, _stop_workers, self._processes, self._connections, slots)
        for w in range(num_workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_loop, name=f"face-loader-{w}", daemon=True,
                                      args=(dataset, slots, theirs, os.getpid()))
            process.start()
            theirs.close()
            self._connections.append(ours)
            self._processes.append(process)

    @property
    def processes(self) -> list:
        return list(self._processes)

    def restart(self) -> int:
        """Wait out the batches still in flight from an earlier iteration; a new generation starts."""
        while self.in_flight:
            self.free.append(self.receive(raise_dataset_errors=False))
        self.generation += 1
        self.submitted = 0
        return self.generation

    def submit(self, batch: list[tuple[int, int]] | None) -> bool:
        """Send the next batch (or nothing at the end of the epoch) to its worker, into a free slot; True if sent."""
        if batch is None:
            return False
        k, worker = self.submitted, self.submitted % self.num_workers
        task = (self.free.popleft(), np.array([i for i, _ in batch], dtype=np.int64).tobytes(), batch[0][1])
        try:
            self._connections[worker].send(task)
        except OSError:
            raise self._dead(worker) from None
        self.submitted, self.in_flight = k + 1, self.in_flight + 1
        return True

    def receive(self, raise_dataset_errors: bool = True) -> int:
        """The slot of the oldest batch in flight, once its worker has filled it (the caller now holds it)."""
        k = self.submitted - self.in_flight
        worker, connection = k % self.num_workers, self._connections[k % self.num_workers]
        deadline = time.monotonic() + self.timeout
        while not connection.poll(0.1):
            if self._processes[worker].exitcode is not None:
                raise self._dead(worker)
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"loader worker {worker} (pid {self._processes[worker].pid}) sent no batch "
                                   f"for {self.timeout:.0f} s")
        try:
            slot, error = connection.recv()
        except (EOFError, OSError):
            raise self._dead(worker) from None
        self.in_flight -= 1
        if error is not None and raise_dataset_errors:
            self.free.append(slot)
            raise error
        return slot

    def _dead(self, worker: int) -> RuntimeError:
        """The error for a worker that is gone; the other workers are stopped too."""
        process = self._processes[worker]
        process.join(1.0)
        self.close()
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return RuntimeError(f"loader worker {worker} (pid {process.pid}) {how}; see its output above "
                            "(out of memory? the kernel log says)")


def _worker_loop(dataset: BatchSource, slots: _Slots, connection: Any, parent: int) -> None:
    """A worker: (slot, int64 indices as bytes, epoch) -> fill the slot -> (slot, None or the exception). Ends on
    None, on a closed pipe, or when the training process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process, which stops us
    try:
        while True:
            while not connection.poll(1.0):
                if os.getppid() != parent:
                    return
            task = connection.recv()
            if task is None:
                return
            slot, indices, epoch = task
            try:
                dataset.load_batch(np.frombuffer(indices, np.int64), epoch, slots.images[slot], slots.labels[slot])
                connection.send((slot, None))
            except Exception as err:  # reported to the training process, which raises it
                err.add_note(f"in loader worker pid {os.getpid()}:\n{traceback.format_exc()}")
                try:
                    pickle.loads(pickle.dumps(err))
                except Exception:  # an exception that does not survive pickling travels as its text
                    err = RuntimeError(f"{type(err).__name__}: {err}\n{err.__notes__[0]}")
                connection.send((slot, err))
    except (EOFError, OSError, KeyboardInterrupt):
        return


def _stop_workers(processes: list, connections: list, slots: _Slots) -> None:
    for connection in connections:
        with contextlib.suppress(OSError):
            connection.send(None)
    for process in processes:
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
    for connection in connections:
        connection.close()
    slots.release()
