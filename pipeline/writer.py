"""Background chunk writers: the forward pass hands over whole chunks and moves on.

A bounded queue keeps memory flat; the forward thread only waits when the
disk falls `queue_size` chunks behind. Each item is one chunk of every array
being harvested. A writer casts to the storage dtype, checks float16 for
overflow, writes the chunk, fsyncs its file and directories, and only then
logs it as done (the log line fsynced too), so a kill or a power cut at any
moment leaves either a logged, durable chunk or one that will be redone.

A writer's exception (an OSError for a full disk included) is re-raised as
itself in the forward thread, and nothing more is written after it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.store import ProgressLog, to_storage, write_chunk


@dataclass
class ChunkJob:
    chunk: int
    arrays: dict  # (layer, hook) -> CPU tensor [rows, d] (or a CUDA tensor awaiting `event`)
    event: object = None  # torch.cuda.Event recorded after the device->host copies


class Float16Overflow(UserError):
    pass


class ChunkWriter:
    def __init__(self, targets: dict, logs: dict[tuple, ProgressLog], logical_dtypes: dict[tuple, str],
                 n_threads: int, queue_size: int):
        self.targets, self.logs, self.logical_dtypes = targets, logs, logical_dtypes
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.errors: list[BaseException] = []
        self.bytes_written = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(n_threads)]
        for t in self.threads:
            t.start()

    def put(self, job: ChunkJob):
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(job, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self):
        """Wait for every queued chunk, stop the threads, re-raise a writer's error."""
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        self._raise_if_failed()

    def _raise_if_failed(self):
        if self.errors:
            raise self.errors[0]

    def _work(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.errors:
                continue  # drain: a failed harvest writes nothing more
            try:
                self._write(job)
            except BaseException as e:  # noqa: BLE001 - handed to the forward thread as it is
                self.errors.append(e)

    def _write(self, job: ChunkJob):
        if job.event is not None:
            job.event.synchronize()
        nbytes = 0
        for key, t in job.arrays.items():
            data = to_storage(t, self.logical_dtypes[key])
            if self.logical_dtypes[key] == "float16" and np.isinf(data).any() and torch.isfinite(t).all():
                layer, hook = key
                raise Float16Overflow(
                    f"float16 overflow: layer {layer} {hook} has activations beyond ±65504 "
                    f"(chunk {job.chunk}); set harvest.storage_dtype: bfloat16 (same size, no overflow) "
                    "or float32, then start this array over: `saepipe harvest CONFIG --force` "
                    "(make harvest ARGS=--force)"
                )
            write_chunk(self.targets[key], job.chunk, data)
            self.logs[key].add(job.chunk)
            nbytes += data.nbytes
        with self._lock:
            self.bytes_written += nbytes
