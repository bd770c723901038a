"""What the scheduler asks the worker to do with snapshots before a step.

The scheduler decides where each snapshot lives and which blocks a resumed
request copies it into; the worker holds the data (KV pages, the sink keys'
first copy). A step's ops travel with vLLM's ``SchedulerOutput`` and run in
the order they were issued, before anything else the step does: a block that a
later op, or the step's forward pass, writes has been read by the earlier ops.
Plain frozen dataclasses, so they pickle to every tensor-parallel worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KeepStream:
    """A request that finished this step left its stream as snapshot ``snapshot_id``."""

    request_id: str
    snapshot_id: str


@dataclass(frozen=True)
class CopyBlocks:
    """Copy whole KV blocks ``src[i]`` to ``dst[i]`` (every layer, keys and values)."""

    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass(frozen=True)
class SpillSnapshot:
    """Copy the snapshot's blocks (in this order) to host memory: the pool gives them up."""

    snapshot_id: str
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class RestoreSnapshot:
    """Write the snapshot back into ``blocks`` (the order it was read in): from its host
    copy, or from ``files``, each rank's checked file (header, payload) read by the scheduler."""

    snapshot_id: str
    blocks: tuple[int, ...]
    files: tuple[tuple[Any, bytearray], ...] | None = None


@dataclass(frozen=True)
class SaveSnapshot:
    """Write the snapshot's blocks (in this order) and sink keys to a file per rank,
    ``directory/<key>.<rank>.snap``, with ``header`` (the rank's own fields added)."""

    snapshot_id: str
    blocks: tuple[int, ...]
    directory: str
    header: dict[str, Any]


@dataclass(frozen=True)
class EvictHostCopy:
    """Free the snapshot's host copy; it lives on elsewhere (the pool)."""

    snapshot_id: str


@dataclass(frozen=True)
class DropSnapshot:
    """The snapshot is gone from every tier: forget what the worker holds of it."""

    snapshot_id: str


SnapshotOp = (
    KeepStream
    | CopyBlocks
    | SpillSnapshot
    | RestoreSnapshot
    | SaveSnapshot
    | EvictHostCopy
    | DropSnapshot
)

OPS_ATTRIBUTE = "vllm_sink_snapshot_ops"
"""The attribute of vLLM's ``SchedulerOutput`` that carries a step's ops to the worker."""
