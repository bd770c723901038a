"""The worker's half of snapshots: the ops that move their blocks, their host copies, sink keys.

The scheduler decides where snapshots live and what a resumed request copies
(:mod:`vllm_sink.scheduler.snapshot_keeper`); the worker carries out its ops
(:mod:`vllm_sink.core.snapshot_ops`) before each step, holds the host copies
of the snapshots the pool gave up, hands their files to a background writer
(:mod:`vllm_sink.worker.snapshot_writer`), and keeps what the cache does not hold:
each snapshot's sink keys as first computed, from which a resumed stream goes
on rotating its sinks, so that rounding never builds up however many times a
conversation is resumed.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from vllm_sink.core.snapshot_file import SnapshotHeader, file_name
from vllm_sink.core.snapshot_ops import (
    CopyBlocks,
    DropSnapshot,
    EvictHostCopy,
    KeepStream,
    RestoreSnapshot,
    SaveSnapshot,
    SnapshotOp,
    SpillSnapshot,
)
from vllm_sink.core.stream_state import StreamState
from vllm_sink.worker.kv_pages import KVPages
from vllm_sink.worker.snapshot_writer import SnapshotWriter


class SnapshotVault:
    """What the worker holds of each snapshot, by snapshot id."""

    def __init__(self, pages: KVPages, rank: int = 0) -> None:
        self.pages = pages
        self.rank = rank
        self._sink_keys: dict[str, torch.Tensor | None] = {}
        self._host: dict[str, list[torch.Tensor]] = {}
        """Host copies of snapshots' blocks (:meth:`KVPages.read`)."""
        self._finished: dict[str, StreamState] = {}
        """Streams whose request ended since the last step, until its ops say which are kept."""
        self.figures = dict.fromkeys(
            ("snapshot_spill_us", "snapshot_restore_us", "snapshot_disk_writes",
             "snapshot_disk_write_us"), 0
        )  # fmt: skip
        """Time spent copying snapshots to host memory and back, files written (board fields)."""
        self._writer: SnapshotWriter | None = None

    def __len__(self) -> int:
        return len(self._sink_keys)

    def finished(self, request_id: str, stream: StreamState) -> None:
        self._finished[request_id] = stream

    def apply(self, ops: Iterable[SnapshotOp], running: Mapping[str, StreamState]) -> None:
        """Carry out a step's ops, in order; streams that ended and were not kept go.

        ``running``: the streams still running (a snapshot of one's computed prompt).
        """
        for op in ops:
            if isinstance(op, KeepStream):
                stream = self._finished.get(op.request_id) or running.get(op.request_id)
                self._sink_keys[op.snapshot_id] = None if stream is None else stream.first_sink_keys
            elif isinstance(op, CopyBlocks):
                self.pages.copy(op.src, op.dst)
            elif isinstance(op, SpillSnapshot):
                start = time.perf_counter()
                self._host[op.snapshot_id] = self.pages.read(op.blocks)
                self._took("snapshot_spill_us", start)
            elif isinstance(op, RestoreSnapshot):
                start = time.perf_counter()
                if op.files is None:
                    self.pages.write(op.blocks, self._host[op.snapshot_id])
                else:
                    self._restore_file(op.snapshot_id, op.blocks, *op.files[self.rank])
                self._took("snapshot_restore_us", start)
            elif isinstance(op, SaveSnapshot):
                self._save(op)
            elif isinstance(op, EvictHostCopy):
                del self._host[op.snapshot_id]
            elif isinstance(op, DropSnapshot):
                self._sink_keys.pop(op.snapshot_id, None)
                self._host.pop(op.snapshot_id, None)
            else:
                raise TypeError(f"vllm-sink: unknown snapshot op {op!r}")
        self._finished.clear()

    def _save(self, op: SaveSnapshot) -> None:
        """Hand the snapshot's pages (read now: the blocks may be reused) to the writer."""
        if self._writer is None:
            self._writer = SnapshotWriter(self._written)
            weakref.finalize(self, self._writer.close)
        sink_keys = self._sink_keys.get(op.snapshot_id)
        sink_keys = None if sink_keys is None else sink_keys.to("cpu")
        pages = self.pages.read(op.blocks)
        header = {
            **op.header,
            "rank": self.rank,
            "sink_keys": None
            if sink_keys is None
            else {"dtype": str(sink_keys.dtype).removeprefix("torch."),
                  "shape": list(sink_keys.shape)},
            "page_bytes": [page.shape[1] for page in pages],
            "num_blocks": len(op.blocks),
        }  # fmt: skip
        key = bytes.fromhex(op.header["snapshot"]["key"])
        self._writer.save(Path(op.directory) / file_name(key, self.rank), header, sink_keys, pages)

    def _written(self, size: int, seconds: float) -> None:
        self.figures["snapshot_disk_writes"] += 1
        self.figures["snapshot_disk_write_us"] += int(seconds * 1e6)

    def _restore_file(
        self, snapshot_id: str, blocks: tuple[int, ...], header: SnapshotHeader, payload: bytearray
    ) -> None:
        """Write a checked file's pages into ``blocks``; keep its sink keys."""
        if header.page_bytes != [page.shape[1] for page in self.pages.pages]:
            raise RuntimeError(
                f"vllm-sink: snapshot {snapshot_id} has pages of {header.page_bytes} bytes, "
                "this worker's are not: its engine fingerprint should have told them apart"
            )
        data = torch.frombuffer(payload, dtype=torch.uint8)
        offset = 0
        sink_keys = None
        if header.sink_keys is not None:
            dtype = getattr(torch, header.sink_keys["dtype"])
            shape = header.sink_keys["shape"]
            size = math.prod(shape) * dtype.itemsize
            sink_keys = data[:size].view(dtype).view(shape).to(self.pages.device)
            offset = size
        pages = []
        for page_bytes in header.page_bytes:
            size = page_bytes * len(blocks)
            pages.append(data[offset : offset + size].view(len(blocks), page_bytes))
            offset += size
        self.pages.write(blocks, pages)
        self._sink_keys[snapshot_id] = sink_keys

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the snapshot files asked for so far (tests, shutdown)."""
        return self._writer is None or self._writer.flush(timeout_s)

    @property
    def host_bytes(self) -> int:
        return sum(t.nbytes for pages in self._host.values() for t in pages)

    def _took(self, field: str, start: float) -> None:
        if self.pages.device.type == "cuda":
            torch.cuda.synchronize(self.pages.device)
        self.figures[field] += int((time.perf_counter() - start) * 1e6)

    def first_sink_keys(self, snapshot_id: str) -> torch.Tensor | None:
        """The snapshot's sink keys at positions ``0 .. S-1``; ``None`` if never copied."""
        return self._sink_keys.get(snapshot_id)
