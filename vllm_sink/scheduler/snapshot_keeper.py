"""Where each snapshot lives (the KV block pool, host memory, disk), and the ops that move it.

* **Pool.** A snapshot's blocks go back to the block pool as free blocks that
  stay readable until reused (``BlockPool.unpin_blocks``), behind the blocks
  requests free, so the pool hands them out last, least recently used first.
  At most ``pool_snapshots`` are kept there.
* **Host.** What the pool gives up (a block handed out, or the count limit) is
  spilled to the worker's host memory within ``host_bytes``, least recently
  used out first.
* **Disk.** Every finished request's snapshot is written to a file per rank as
  it is made (in the background), within ``disk_bytes``, least recently used out
  first (a prompt's snapshot, :meth:`SnapshotKeeper.keep` with ``copy``, stays
  in memory: the reply's covers a restart); other
  engines sharing the directory (a restarted server, replicas) find it there
  (:mod:`vllm_sink.scheduler.snapshot_directory`).

A snapshot no tier holds is gone. A request that resumes a snapshot gets a copy
of its pool blocks (:meth:`SnapshotKeeper.copy_row`): the snapshot stays as it
is for the next request that continues the same stream. One found in host
memory or on disk is first restored into fresh pool blocks. The worker carries
out the ops before the step (:mod:`vllm_sink.core.snapshot_ops`), in the order
issued; the blocks a copy reads are held until the step is scheduled, then
released as the most recently used.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_sink.core.snapshot_file import snapshot_fields
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
from vllm_sink.core.snapshots import Snapshot, SnapshotIndex
from vllm_sink.scheduler.vllm_scheduler import (
    Block,
    Row,
    free_block_count,
    free_readable,
    hold_blocks,
    new_blocks,
    null_block,
)

if TYPE_CHECKING:
    from vllm_sink.scheduler.snapshot_directory import SnapshotDirectory

TIERS = ("pool", "host", "disk")
SCAN_INTERVAL_S = 5.0
"""How often the directory is looked at (budget, files others wrote or removed)."""
RESCAN_ON_MISS_S = 0.25
"""A miss looks at the directory again if it was looked at longer ago than this."""
SAVE_GRACE_S = 60.0
"""A file being written is not missed from the directory for this long."""
HEADER_ALLOWANCE = 16 * 1024
"""A snapshot file's header, besides its tokens since its cache last changed (8 bytes each)."""


@dataclass(frozen=True)
class TierSizes:
    pool_snapshots: int
    """Most snapshots in the pool (``--streaming-snapshots``)."""
    host_bytes: int = 0
    """Host memory for snapshots, per worker."""
    disk_bytes: int = 0
    """Disk for snapshot files, all ranks' together."""
    bytes_per_block: int = 0
    """Bytes of KV one block holds on one worker, what a spill of it costs."""
    sink_key_bytes: int = 0
    """Bytes of one worker's sink keys' first copy (in each of its files)."""
    ranks: int = 1


class SnapshotKeeper:
    """The snapshots of one engine, in every tier; the ops the worker carries out for them."""

    def __init__(
        self,
        block_pool: Any,
        block_size: int,
        sizes: TierSizes,
        salt: bytes,
        disk: SnapshotDirectory | None = None,
    ) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.sizes = sizes
        self.disk = disk if sizes.disk_bytes else None
        self.index = SnapshotIndex(block_size, salt)
        """Every snapshot, in any tier, least recently used first."""
        self._pool: OrderedDict[bytes, tuple[Row, ...]] = OrderedDict()
        """Pool snapshots' blocks, one row per KV cache group, least recently used first."""
        self._host: OrderedDict[bytes, int] = OrderedDict()
        """Host snapshots' sizes in bytes, least recently used first."""
        self._disk: OrderedDict[bytes, int] = OrderedDict()
        """Disk snapshots' sizes in bytes, least recently used first."""
        self._saving: dict[bytes, float] = {}
        """Files being written (not seen in the directory yet), by when they were asked for."""
        self._scanned_at = float("-inf")
        self._key_of_block: dict[int, bytes] = {}
        self._retained: list[Block] = []
        """Blocks this step's copies read, held until the step is scheduled."""
        self._ops: list[SnapshotOp] = []
        self._restoring: bytes | None = None
        """The snapshot being restored (its host copy or files must stay until then)."""
        self.spills = 0
        self.disk_read_seconds = 0.0
        if self.disk is not None:
            self.scan()

    @property
    def capacity(self) -> int:
        return self.sizes.pool_snapshots

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_blocks(self) -> int:
        """Pool blocks holding snapshots."""
        return len(self._key_of_block)

    def tier_figures(self) -> dict[str, tuple[int, int]]:
        """Per tier, the snapshots it holds and their bytes (pool and host: one worker's)."""
        return {
            "pool": (len(self._pool), self.num_blocks * self.sizes.bytes_per_block),
            "host": (len(self._host), sum(self._host.values())),
            "disk": (len(self._disk), sum(self._disk.values())),
        }

    # ---------------------------------------------------------------- keeping
    def keep(
        self,
        request_id: str,
        tokens: Sequence[int],
        request_salt: str,
        rows: tuple[Row, ...],
        freed_until: tuple[int, ...],
        resumable_from: int,
        shift: int,
        copy: bool = False,
        skipped: int = 0,
    ) -> bool:
        """Keep ``rows`` as the snapshot of ``tokens``: a finished request's, whose references
        it hands over, or (``copy``) a running request's, copied into fresh blocks.

        A copy is not made if the snapshot exists already or the pool has no room for it.
        ``skipped``: the stream is a cut prompt's (:class:`~vllm_sink.core.snapshots.Snapshot`).
        """
        snapshot = self.index.make(
            tokens, request_salt, resumable_from, shift, freed_until, skipped
        )
        replaced = self.index.get(snapshot.key)
        if copy:
            if replaced is not None or free_block_count(self.block_pool) < len(_live(rows)):
                return False
            rows = tuple(tuple(self.copy_row(row)) for row in rows)
        elif replaced is not None:
            self._forget(replaced, remove_files=False)
        self.index.add(snapshot)
        self._ops.append(KeepStream(request_id, snapshot.snapshot_id))
        if self.disk is not None and not copy:  # a prompt's snapshot serves in memory only
            self._save(snapshot, _live(rows))
        self._into_pool(snapshot, rows)
        return True

    def _into_pool(self, snapshot: Snapshot, rows: tuple[Row, ...]) -> None:
        """``rows`` (referenced by the caller) become the pool copy of ``snapshot``."""
        self._pool[snapshot.key] = rows
        live = _live(rows)
        for block in live:
            self._key_of_block[block.block_id] = snapshot.key
        free_readable(self.block_pool, live, self._on_reuse)
        while len(self._pool) > self.capacity:
            self._leave_pool(self.index.get(next(iter(self._pool))))

    def _on_reuse(self, block: Block) -> None:
        """One of a pool snapshot's blocks is being handed out: the pool gives it up.

        Runs inside ``BlockPool.get_new_blocks``: it must not touch the pool.
        """
        snapshot = self.snapshot_of(block)
        if snapshot is not None:
            self._leave_pool(snapshot)

    def _leave_pool(self, snapshot: Snapshot) -> None:
        """Spill a snapshot the pool gives up to host memory, unless a lower tier holds it."""
        rows = self._pool.pop(snapshot.key)
        for block in _live(rows):
            if self._key_of_block.get(block.block_id) == snapshot.key:
                del self._key_of_block[block.block_id]
        if snapshot.key in self._host:
            return
        size = len(_live(rows)) * self.sizes.bytes_per_block
        if self._make_room(self._host, self.sizes.host_bytes, size):
            self._ops.append(SpillSnapshot(snapshot.snapshot_id, _ids(_live(rows))))
            self._host[snapshot.key] = size
            self.spills += 1
        elif snapshot.key not in self._disk:
            self._forget(snapshot)

    def _save(self, snapshot: Snapshot, live: list[Block]) -> None:
        """Write a new snapshot to disk (the worker does, in the background)."""
        sizes = self.sizes
        per_rank = (
            len(live) * sizes.bytes_per_block
            + sizes.sink_key_bytes
            + HEADER_ALLOWANCE
            + 8 * len(snapshot.tail_tokens)
        )
        if not self._make_room(self._disk, sizes.disk_bytes, per_rank * sizes.ranks):
            return
        header = {
            "engine": self.disk.engine,
            "ranks": sizes.ranks,
            "snapshot": snapshot_fields(snapshot),
        }
        self._ops.append(
            SaveSnapshot(snapshot.snapshot_id, _ids(live), str(self.disk.path), header)
        )
        self._disk[snapshot.key] = per_rank * sizes.ranks
        self._saving[snapshot.key] = time.monotonic()

    def _make_room(self, tier: OrderedDict[bytes, int], budget: int, size: int) -> bool:
        """Evict a tier's least recently used snapshots until ``size`` more bytes fit."""
        if not budget or size > budget:
            return False
        used = sum(tier.values())
        for key in [k for k in tier if k != self._restoring]:
            if used + size <= budget:
                break
            used -= tier[key]
            self._leave(tier, self.index.get(key))
        return used + size <= budget

    def _leave(self, tier: OrderedDict[bytes, int], snapshot: Snapshot) -> None:
        """``snapshot`` leaves the host or disk tier; gone if no other tier holds it."""
        del tier[snapshot.key]
        if tier is self._disk:
            self._saving.pop(snapshot.key, None)
            self.disk.remove(snapshot)
        held = [t for t in (self._pool, self._host, self._disk) if snapshot.key in t]
        if not held:
            self._forget(snapshot)
        elif tier is self._host:
            self._ops.append(EvictHostCopy(snapshot.snapshot_id))

    def _forget(self, snapshot: Snapshot, remove_files: bool = True) -> None:
        self.index.remove(snapshot.key)
        self._host.pop(snapshot.key, None)
        if self._disk.pop(snapshot.key, None) is not None and remove_files:
            self._saving.pop(snapshot.key, None)
            self.disk.remove(snapshot)
        for block in _live(self._pool.pop(snapshot.key, ())):
            if self._key_of_block.get(block.block_id) == snapshot.key:
                del self._key_of_block[block.block_id]
        self._ops.append(DropSnapshot(snapshot.snapshot_id))

    # ------------------------------------------------------------------- disk
    def scan(self) -> None:
        """Bring the disk tier up to date with the directory, and within its budget."""
        if self.disk is None:
            return
        self._scanned_at = now = time.monotonic()
        found = self.disk.scan()
        for key in list(self._disk):
            being_written = now - self._saving.get(key, float("-inf")) < SAVE_GRACE_S
            if key not in found and not being_written:  # removed by another engine
                snapshot = self.index.get(key)
                del self._disk[key]
                self._saving.pop(key, None)
                if snapshot.key not in self._pool and snapshot.key not in self._host:
                    self._forget(snapshot, remove_files=False)
        for key, on_disk in sorted(found.items(), key=lambda item: item[1].used_at):
            self._saving.pop(key, None)
            if self.index.get(key) is None:
                self.index.add(on_disk.snapshot)
            self._disk[key] = on_disk.bytes
            self._disk.move_to_end(key)
        self._make_room(self._disk, self.sizes.disk_bytes, 0)

    def maybe_scan(self) -> None:
        if self.disk is not None and time.monotonic() - self._scanned_at > SCAN_INTERVAL_S:
            self.scan()

    # --------------------------------------------------------------- resuming
    def resume(
        self, tokens: Sequence[int], request_salt: str, max_tokens: int, min_tokens: int = 1
    ) -> tuple[Snapshot, int, tuple[Row, ...], str] | None:
        """The snapshot that resumes the most of ``tokens`` (at most ``max_tokens``), in the pool.

        With how many tokens it resumes, its pool blocks for them and the tier
        it was found in. Of snapshots that resume as many tokens, the one
        cheapest to bring back is taken: in the pool, then in host memory,
        then on disk. One in host memory or on disk is restored into the pool
        first, if the pool has room for it and for the request's copy of it;
        if it has not (or its file is damaged), the next best is tried.
        ``None`` if none resumes ``min_tokens``.
        """
        found = self.index.candidates(tokens, request_salt, max_tokens)
        if (not found or found[0][1] < min_tokens) and self.disk is not None:
            if time.monotonic() - self._scanned_at > RESCAN_ON_MISS_S:
                self.scan()  # another engine may have written it since
                found = self.index.candidates(tokens, request_salt, max_tokens)
        found.sort(key=lambda candidate: (-candidate[1], self._tier_index(candidate[0])))
        for snapshot, length in found:
            if length < min_tokens:
                return None
            tier = TIERS[self._tier_index(snapshot)]
            if tier == "pool" or self._restore(snapshot, tier):
                break
        else:
            return None
        key = snapshot.key
        self.index.used(snapshot)
        for held in self._tiers():
            if key in held:
                held.move_to_end(key)
        if key in self._disk and tier != "disk":
            self.disk.touch(snapshot)
        held = -(-snapshot.stream_length(length) // self.block_size)
        return snapshot, length, tuple(row[:held] for row in self._pool[key]), tier

    def _tier_index(self, snapshot: Snapshot) -> int:
        """0, 1 or 2: the cheapest tier that holds ``snapshot`` (pool, host, disk)."""
        return next(i for i, tier in enumerate(self._tiers()) if snapshot.key in tier)

    def _tiers(self) -> tuple[OrderedDict, ...]:
        return self._pool, self._host, self._disk

    def _restore(self, snapshot: Snapshot, tier: str) -> bool:
        """Restore a host or disk snapshot into fresh pool blocks."""
        groups = range(len(snapshot.freed_until))
        needed = sum(len(snapshot.live_blocks(g)) for g in groups)
        if free_block_count(self.block_pool) < 2 * needed:  # and the request's copy
            return False
        files = None
        if tier == "disk":
            start = time.perf_counter()
            files = self.disk.load(snapshot)
            self.disk_read_seconds += time.perf_counter() - start
            if files is None:  # not whole any more: warned
                self._leave(self._disk, snapshot)
                return False
        self._restoring = snapshot.key  # what this hands out must not evict it
        fresh = iter(new_blocks(self.block_pool, needed))
        null = null_block(self.block_pool)
        rows = []
        for group in groups:
            row = [null] * snapshot.row_length
            for i in snapshot.live_blocks(group):
                row[i] = next(fresh)
            rows.append(tuple(row))
        self._ops.append(
            RestoreSnapshot(snapshot.snapshot_id, _ids(_live(tuple(rows))), files and tuple(files))
        )
        self._into_pool(snapshot, tuple(rows))
        self._restoring = None
        return True

    def snapshot_of(self, block: Block) -> Snapshot | None:
        """The pool snapshot whose blocks include ``block``."""
        key = self._key_of_block.get(block.block_id)
        return None if key is None else self.index.get(key)

    def hand_over(
        self, request_id: str, hit: Sequence[Block], group: int, length: int
    ) -> tuple[Snapshot, list[Block]]:
        """The snapshot a request resumes at ``length`` tokens, and the request's copy of its
        blocks ``hit`` in ``group`` (the cache hit the scheduler offered).

        The hit may stop short of the snapshot's end (inside the span its cache
        has not changed since): blocks past the hit are not copied.
        """
        snapshot = self.snapshot_of(hit[0])
        if snapshot is None or not (
            snapshot.stream_length(snapshot.resumable_from)
            <= length
            <= snapshot.stream_length(snapshot.num_tokens)
            and tuple(hit) == self.pool_row(snapshot, group, length)
        ):
            raise RuntimeError(f"vllm-sink: no snapshot for the cache hit of {request_id}")
        return snapshot, self.copy_row(hit)

    def pool_row(self, snapshot: Snapshot, group: int, length: int) -> Row:
        """The snapshot's pool blocks in ``group`` that hold the first ``length`` tokens of its
        stream."""
        return self._pool[snapshot.key][group][: -(-length // self.block_size)]

    def copy_row(self, row: Sequence[Block]) -> list[Block]:
        """Fresh blocks for a request resuming ``row`` (a snapshot's), filled by a copy.

        The pool must have room for them (the KV manager counts them when vLLM
        asks how many blocks the request needs).
        """
        live = [block for block in row if not block.is_null]
        hold_blocks(self.block_pool, live)  # not handed out before the copy has read them
        self._retained.extend(live)
        fresh = iter(new_blocks(self.block_pool, len(live)))
        copy = [block if block.is_null else next(fresh) for block in row]
        self._ops.append(CopyBlocks(_ids(live), _ids([b for b in copy if not b.is_null])))
        return copy

    def take_ops(self) -> list[SnapshotOp]:
        """The ops for the step just scheduled; the blocks its copies read are released."""
        if self._retained:
            free_readable(self.block_pool, self._retained, self._on_reuse)
            self._retained = []
        ops, self._ops = self._ops, []
        return ops


def _live(rows: tuple[Row, ...]) -> list[Block]:
    return [block for row in rows for block in row if not block.is_null]


def _ids(blocks: Sequence[Block]) -> tuple[int, ...]:
    return tuple(block.block_id for block in blocks)
