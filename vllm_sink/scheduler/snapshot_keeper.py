"""Where each snapshot lives (vLLM's KV block pool, host memory), and the worker ops that move it.

* **Pool.** A snapshot's blocks go back to the block pool as free blocks that
  stay readable until reused (``BlockPool.unpin_blocks``), behind the blocks
  requests free, so the pool hands them out last, least recently used first.
  At most ``capacity`` snapshots are kept there.
* **Host.** What the pool gives up (a block handed out, or the count limit) is
  spilled to the worker's host memory, within ``host_bytes``, least recently
  used out first; without room it is gone.

A request that resumes a snapshot gets a copy of its pool blocks
(:meth:`SnapshotKeeper.copy_row`): the snapshot stays as it is for the next
request that continues the same stream. A snapshot found in host memory is
first restored into fresh pool blocks. The copies run on the worker before the
step (:mod:`vllm_sink.core.snapshot_ops`), in the order issued; the blocks they
read are held until the step is scheduled, then released as the most recently
used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vllm_sink.core.snapshot_ops import (
    CopyBlocks,
    DropSnapshot,
    EvictHostCopy,
    KeepStream,
    RestoreSnapshot,
    SnapshotOp,
    SpillSnapshot,
)
from vllm_sink.scheduler.snapshots import Snapshot, SnapshotIndex

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

Row = tuple["KVCacheBlock", ...]
"""A request's blocks in one KV cache group, null placeholders where freed."""

TIERS = ("pool", "host")


class SnapshotKeeper:
    """The snapshots of one engine, in every tier; the ops the worker carries out for them."""

    def __init__(
        self,
        block_pool: BlockPool,
        block_size: int,
        capacity: int,
        salt: bytes,
        host_bytes: int = 0,
        bytes_per_block: int = 0,
    ) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.capacity = capacity
        """Most snapshots in the pool."""
        self.host_bytes = host_bytes
        self.bytes_per_block = bytes_per_block
        """Bytes of KV one block holds (over every layer), what a spill of it costs."""
        self.index = SnapshotIndex(block_size, salt)
        """Every snapshot, in any tier, least recently used first."""
        self._pool: OrderedDict[bytes, tuple[Row, ...]] = OrderedDict()
        """Pool snapshots' blocks, one row per KV cache group, least recently used first."""
        self._host: OrderedDict[bytes, int] = OrderedDict()
        """Host snapshots' sizes in bytes, least recently used first."""
        self._key_of_block: dict[int, bytes] = {}
        self._retained: list[KVCacheBlock] = []
        """Blocks this step's copies read, held until the step is scheduled."""
        self._ops: list[SnapshotOp] = []
        self._restoring: bytes | None = None
        """The host snapshot being restored (its host copy must stay until then)."""
        self.spills = 0

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_blocks(self) -> int:
        """Pool blocks holding snapshots."""
        return len(self._key_of_block)

    def tier_figures(self) -> dict[str, tuple[int, int]]:
        """Per tier, the snapshots it holds and their bytes."""
        host = sum(self._host.values())
        return {
            "pool": (len(self._pool), self.num_blocks * self.bytes_per_block),
            "host": (len(self._host), host),
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
    ) -> None:
        """Keep a finished request's ``rows`` (whose references it hands over) as a snapshot."""
        snapshot = self.index.make(
            request_id, tokens, request_salt, resumable_from, shift, freed_until
        )
        replaced = self.index.get(snapshot.key)
        if replaced is not None:
            self._forget(replaced)
        self.index.add(snapshot)
        self._ops.append(KeepStream(request_id, snapshot.snapshot_id))
        self._into_pool(snapshot, rows)

    def _into_pool(self, snapshot: Snapshot, rows: tuple[Row, ...]) -> None:
        """``rows`` (referenced by the caller) become the pool copy of ``snapshot``."""
        self._pool[snapshot.key] = rows
        live = _live(rows)
        for block in live:
            self._key_of_block[block.block_id] = snapshot.key
        self.block_pool.unpin_blocks(live, self._on_reuse)
        while len(self._pool) > self.capacity:
            self._leave_pool(self.index.get(next(iter(self._pool))))

    def _on_reuse(self, block: KVCacheBlock) -> None:
        """One of a pool snapshot's blocks is being handed out: the pool gives it up.

        Runs inside ``BlockPool.get_new_blocks``: it must not touch the pool.
        """
        snapshot = self.snapshot_of(block)
        if snapshot is not None:
            self._leave_pool(snapshot)

    def _leave_pool(self, snapshot: Snapshot) -> None:
        """Spill a snapshot the pool gives up, if it is not in host memory yet and fits."""
        rows = self._pool.pop(snapshot.key)
        for block in _live(rows):
            if self._key_of_block.get(block.block_id) == snapshot.key:
                del self._key_of_block[block.block_id]
        if snapshot.key in self._host:
            return
        size = len(_live(rows)) * self.bytes_per_block
        if not self._make_host_room(size):
            self._forget(snapshot)
            return
        self._ops.append(SpillSnapshot(snapshot.snapshot_id, _ids(_live(rows))))
        self._host[snapshot.key] = size
        self.spills += 1

    def _make_host_room(self, size: int) -> bool:
        """Evict least recently used host copies until ``size`` more bytes fit."""
        if not self.host_bytes or size > self.host_bytes:
            return False
        used = sum(self._host.values())
        for key in [k for k in self._host if k != self._restoring]:
            if used + size <= self.host_bytes:
                break
            used -= self._host.pop(key)
            snapshot = self.index.get(key)
            if key in self._pool:
                self._ops.append(EvictHostCopy(snapshot.snapshot_id))
            else:
                self._forget(snapshot)
        return used + size <= self.host_bytes

    def _forget(self, snapshot: Snapshot) -> None:
        self.index.remove(snapshot.key)
        self._host.pop(snapshot.key, None)
        for block in _live(self._pool.pop(snapshot.key, ())):
            if self._key_of_block.get(block.block_id) == snapshot.key:
                del self._key_of_block[block.block_id]
        self._ops.append(DropSnapshot(snapshot.snapshot_id))

    # --------------------------------------------------------------- resuming
    def resume(
        self, tokens: Sequence[int], request_salt: str, max_tokens: int
    ) -> tuple[Snapshot, int, tuple[Row, ...], str] | None:
        """The snapshot that resumes the most of ``tokens`` (at most ``max_tokens``), in the pool.

        With how many tokens it resumes, its pool blocks for them and the tier
        it was found in. A snapshot in host memory is restored into the pool
        first, if the pool has room for it and for the request's copy of it;
        else ``None``.
        """
        found = self.index.find(tokens, request_salt, max_tokens)
        if found is None:
            return None
        snapshot, length = found
        tier = "pool" if snapshot.key in self._pool else "host"
        if tier == "host" and not self._restore(snapshot):
            return None
        self.index.used(snapshot)
        self._pool.move_to_end(snapshot.key)
        if snapshot.key in self._host:
            self._host.move_to_end(snapshot.key)
        held = -(-length // self.block_size)
        return snapshot, length, tuple(row[:held] for row in self._pool[snapshot.key]), tier

    def _restore(self, snapshot: Snapshot) -> bool:
        """Restore a host snapshot into fresh pool blocks."""
        groups = range(len(snapshot.freed_until))
        needed = sum(len(snapshot.live_blocks(g)) for g in groups)
        if self.block_pool.get_num_free_blocks() < 2 * needed:  # and the request's copy
            return False
        self._restoring = snapshot.key  # spills this causes evict other host copies
        fresh = iter(self.block_pool.get_new_blocks(needed))
        null = self.block_pool.null_block
        rows = []
        for group in groups:
            row = [null] * snapshot.row_length
            for i in snapshot.live_blocks(group):
                row[i] = next(fresh)
            rows.append(tuple(row))
        self._ops.append(RestoreSnapshot(snapshot.snapshot_id, _ids(_live(tuple(rows)))))
        self._into_pool(snapshot, tuple(rows))
        self._restoring = None
        return True

    def snapshot_of(self, block: KVCacheBlock) -> Snapshot | None:
        """The pool snapshot whose blocks include ``block``."""
        key = self._key_of_block.get(block.block_id)
        return None if key is None else self.index.get(key)

    def pool_row(self, snapshot: Snapshot, group: int, length: int) -> Row:
        """The snapshot's pool blocks in ``group`` that hold its first ``length`` tokens."""
        return self._pool[snapshot.key][group][: -(-length // self.block_size)]

    def copy_row(self, row: Sequence[KVCacheBlock]) -> list[KVCacheBlock]:
        """Fresh blocks for a request resuming ``row`` (a snapshot's), filled by a copy.

        The pool must have room for them (the KV manager counts them when vLLM
        asks how many blocks the request needs).
        """
        live = [block for block in row if not block.is_null]
        self.block_pool.touch(live)  # not handed out before the copy has read them
        self._retained.extend(live)
        fresh = iter(self.block_pool.get_new_blocks(len(live)))
        copy = [block if block.is_null else next(fresh) for block in row]
        self._ops.append(CopyBlocks(_ids(live), _ids([b for b in copy if not b.is_null])))
        return copy

    def take_ops(self) -> list[SnapshotOp]:
        """The ops for the step just scheduled; the blocks its copies read are released."""
        if self._retained:
            self.block_pool.unpin_blocks(self._retained, self._on_reuse)
            self._retained = []
        ops, self._ops = self._ops, []
        return ops


def _live(rows: tuple[Row, ...]) -> list[KVCacheBlock]:
    return [block for row in rows for block in row if not block.is_null]


def _ids(blocks: Sequence[KVCacheBlock]) -> tuple[int, ...]:
    return tuple(block.block_id for block in blocks)
