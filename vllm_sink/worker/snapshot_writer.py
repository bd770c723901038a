"""Snapshot files written in the background: a step never waits for the disk.

The worker copies a snapshot's pages to host memory before the step (they may
be reused right after); this thread writes them out
(:func:`vllm_sink.core.snapshot_file.write`), at the lowest CPU priority, so that
serving keeps the cores it computes on. A full queue (a disk slower than
the snapshots come) or a failed write loses that file only, with a warning: a
snapshot that is not on disk is one that is not resumed from there.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_sink.core import snapshot_file

logger = init_logger("vllm.vllm_sink")

MAX_PENDING = 16
"""Files waiting to be written, at most; more are dropped (their pages are held in memory)."""
EXIT_FLUSH_S = 30.0
_STOP = object()


class SnapshotWriter:
    """One background thread writing snapshot files, in the order given.

    The thread holds the owner of ``on_written`` (a bound method) weakly: an
    engine shut down in a process that goes on (the offline ``LLM``) frees its
    KV pool. :meth:`close` ends the thread once what was queued is written.
    """

    def __init__(self, on_written: Callable[[int, float], None] | None = None) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._on_written: Callable[[], Callable[[int, float], None] | None] | None = None
        """Gives what is called with each file's size and the seconds its writing took."""
        if inspect.ismethod(on_written):
            self._on_written = weakref.WeakMethod(on_written)
        elif on_written is not None:
            self._on_written = lambda: on_written
        self.failures = 0
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="vllm-sink-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush, EXIT_FLUSH_S)

    def save(
        self,
        path: Path,
        header: dict[str, Any],
        sink_keys: torch.Tensor | None,
        pages: list[torch.Tensor],
    ) -> None:
        if self._jobs.qsize() >= MAX_PENDING:
            self._warn("queue", "vllm-sink: snapshot files are written slower than they come; "
                       "dropping some (they are not resumed from disk)")  # fmt: skip
            self.failures += 1
            return
        self._jobs.put((path, header, sink_keys, pages))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every file given so far is written (or failed); ``False`` on timeout."""
        done = threading.Event()
        self._jobs.put(done)
        return done.wait(timeout_s)

    def close(self) -> None:
        """Write what is queued, then end the thread (without waiting for it)."""
        atexit.unregister(self.flush)
        self._jobs.put(_STOP)

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if isinstance(job, threading.Event):
                job.set()
            else:
                self._write(*job)
            del job  # the thread, waiting for the next job, holds no pages

    def _write(
        self, path: Path, header: dict[str, Any], sink_keys: torch.Tensor | None,
        pages: list[torch.Tensor],
    ) -> None:  # fmt: skip
        start = time.perf_counter()
        try:
            chunks = [] if sink_keys is None else [_bytes(sink_keys)]
            size = snapshot_file.write(path, header, chunks + [_bytes(p) for p in pages])
        except Exception as error:  # a request never fails because the disk did
            self.failures += 1
            self._warn(
                type(error).__name__,
                f"vllm-sink: cannot write snapshot file {path}: {error}; "
                "snapshots are not kept on disk while this fails",
            )
            return
        on_written = None if self._on_written is None else self._on_written()
        if on_written is not None:
            on_written(size, time.perf_counter() - start)

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:  # once per kind: a full disk fails every write
            self._warned.add(kind)
            logger.warning(message)


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().view(torch.uint8).numpy())
