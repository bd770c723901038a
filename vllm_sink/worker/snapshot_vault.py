"""The worker's half of snapshots: the ops that move their blocks, their host copies, sink keys.

The scheduler decides where snapshots live and what a resumed request copies
(:mod:`vllm_sink.scheduler.snapshot_keeper`); the worker carries out its ops
(:mod:`vllm_sink.core.snapshot_ops`) before each step, holds the host copies
of the snapshots the pool gave up, and keeps what the cache does not hold:
each snapshot's sink keys as first computed, from which a resumed stream goes
on rotating its sinks, so that rounding never builds up however many times a
conversation is resumed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from vllm_sink.core.snapshot_ops import (
    CopyBlocks,
    DropSnapshot,
    EvictHostCopy,
    KeepStream,
    RestoreSnapshot,
    SnapshotOp,
    SpillSnapshot,
)
from vllm_sink.core.stream_state import StreamState
from vllm_sink.worker.kv_pages import KVPages


class SnapshotVault:
    """What the worker holds of each snapshot, by snapshot id."""

    def __init__(self, pages: KVPages) -> None:
        self.pages = pages
        self._sink_keys: dict[str, torch.Tensor | None] = {}
        self._host: dict[str, list[torch.Tensor]] = {}
        """Host copies of snapshots' blocks (:meth:`KVPages.read`)."""
        self._finished: dict[str, StreamState] = {}
        """Streams whose request ended since the last step, until its ops say which are kept."""
        self.microseconds = {"snapshot_spill_us": 0, "snapshot_restore_us": 0}
        """Time spent copying snapshots to host memory and back (board fields)."""

    def __len__(self) -> int:
        return len(self._sink_keys)

    def finished(self, request_id: str, stream: StreamState) -> None:
        self._finished[request_id] = stream

    def apply(self, ops: Iterable[SnapshotOp]) -> None:
        """Carry out a step's ops, in order; streams that ended and were not kept go."""
        for op in ops:
            if isinstance(op, KeepStream):
                stream = self._finished.get(op.request_id)
                self._sink_keys[op.snapshot_id] = None if stream is None else stream.first_sink_keys
            elif isinstance(op, CopyBlocks):
                self.pages.copy(op.src, op.dst)
            elif isinstance(op, SpillSnapshot):
                start = time.perf_counter()
                self._host[op.snapshot_id] = self.pages.read(op.blocks)
                self._took("snapshot_spill_us", start)
            elif isinstance(op, RestoreSnapshot):
                start = time.perf_counter()
                self.pages.write(op.blocks, self._host[op.snapshot_id])
                self._took("snapshot_restore_us", start)
            elif isinstance(op, EvictHostCopy):
                del self._host[op.snapshot_id]
            elif isinstance(op, DropSnapshot):
                self._sink_keys.pop(op.snapshot_id, None)
                self._host.pop(op.snapshot_id, None)
            else:
                raise TypeError(f"vllm-sink: unknown snapshot op {op!r}")
        self._finished.clear()

    @property
    def host_bytes(self) -> int:
        return sum(t.nbytes for pages in self._host.values() for t in pages)

    def _took(self, field: str, start: float) -> None:
        if self.pages.device.type == "cuda":
            torch.cuda.synchronize(self.pages.device)
        self.microseconds[field] += int((time.perf_counter() - start) * 1e6)

    def first_sink_keys(self, snapshot_id: str) -> torch.Tensor | None:
        """The snapshot's sink keys at positions ``0 .. S-1``; ``None`` if never copied."""
        return self._sink_keys.get(snapshot_id)
