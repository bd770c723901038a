"""Finished streams kept for the request that continues them.

When a stream's request ends, its cache (head block, resident window blocks)
still holds the exact state of a stream over its first ``N`` tokens. Instead
of freeing those blocks, the scheduler keeps them as a :class:`Snapshot` keyed
by those tokens (:mod:`vllm_sink.core.token_prefix`); a new request whose prompt
begins with the same ``N`` tokens takes the blocks over and prefills only the
rest, as if its stream had never stopped.

A prompt may also part from the snapshot's tokens inside the stream's last
step (typically its last token: a completion's final token re-tokenized with
the text the client appends). Evictions are decided once per step, at its
start, so the cache over the first ``L`` tokens, for any ``L`` from that step's
start to ``N``, is the state of a stream whose last step was cut at ``L``;
the request resumes at the longest such ``L`` and recomputes from there.

Snapshots never hold memory a live stream needs: their blocks go back to
vLLM's block pool as free blocks that stay readable until reused
(``BlockPool.unpin_blocks``), behind the blocks requests free, so the pool
hands them out last and oldest snapshot first. When one of a snapshot's
blocks is handed out, the whole snapshot is dropped. A snapshot is used once:
the request that resumes it owns its blocks and writes into them (evictions
refill the head block, re-rotations move the window), so a second request with
the same prefix streams from the start.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_sink.core.token_prefix import PrefixKeys

RESUME_KEY = "vllm_sink_resume"
"""``extra_args`` entry the scheduler gives a request that continues a snapshot, for the
worker: ``(source request id, tokens computed before the source's last step)``."""


def resume_source(params: Any) -> tuple[str, int] | None:
    """The :data:`RESUME_KEY` entry of a request's sampling parameters, if it has one."""
    extra = (params.extra_args or {}) if params is not None else {}
    if RESUME_KEY not in extra:
        return None
    source, last_step_start = extra[RESUME_KEY]
    return str(source), int(last_step_start)


@dataclass(frozen=True)
class Snapshot:
    key: bytes
    """The key of the tokens it covers (:class:`~vllm_sink.core.token_prefix.PrefixKeys`)."""
    source_request_id: str
    """The request whose stream this is (the worker keeps its state under this id)."""
    num_tokens: int
    """``N``: tokens whose KV the blocks hold."""
    last_step_start: int
    """Tokens computed before the stream's last step: its evictions were decided at this count."""
    start_key: bytes
    """The key of the first :attr:`last_step_start` tokens."""
    last_step_tokens: tuple[int, ...]
    """The tokens the last step computed (``N - last_step_start`` of them)."""
    blocks: tuple[tuple[Any, ...], ...]
    """The request's KV blocks in each KV cache group, null placeholders where freed."""
    freed_until: tuple[int, ...]
    """Per group, the block index below which the request's blocks were freed."""

    def resumable_length(self, tokens: Sequence[int], max_tokens: int) -> int:
        """Tokens of ``tokens`` (whose first :attr:`last_step_start` match) it can resume."""
        length = self.last_step_start
        for ours, theirs in zip(self.last_step_tokens, tokens[length:max_tokens]):
            if ours != theirs:
                break
            length += 1
        return length


class SnapshotStore:
    """At most ``capacity`` snapshots, by key; dropped oldest first or when a block is reused.

    Keys are salted with the engine's ``salt`` (model and streaming settings: a
    cache is only valid under the policy that built it) and the request's own
    (its ``cache_salt``, vLLM's per-request isolation of cached KV, and its
    LoRA adapter).
    """

    def __init__(self, capacity: int, block_size: int, salt: bytes) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.salt = salt
        self._by_key: OrderedDict[bytes, Snapshot] = OrderedDict()
        self._key_of_block: dict[int, bytes] = {}
        self._handed_over: dict[bytes, set[int]] = {}
        """Groups whose blocks a snapshot being resumed has handed over so far."""

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def num_blocks(self) -> int:
        return len(self._key_of_block)

    def _keys(self, tokens: Sequence[int], request_salt: str) -> PrefixKeys:
        salt = self.salt + request_salt.encode()
        return PrefixKeys(tokens, self.block_size, salt)

    def add(
        self,
        tokens: Sequence[int],
        request_salt: str,
        source_request_id: str,
        last_step_start: int,
        blocks: tuple[tuple[Any, ...], ...],
        freed_until: tuple[int, ...],
        release: Callable[[Snapshot], None],
    ) -> None:
        """Keep the snapshot of a stream over ``tokens``; the oldest goes if the store is full.

        ``release`` gets the new snapshot, to put its blocks in the free queue.
        """
        keys = self._keys(tokens, request_salt)
        key = keys.key(len(tokens))
        if key in self._by_key:
            self.drop(key)
        elif len(self._by_key) >= self.capacity:
            self.drop(next(iter(self._by_key)))
        snapshot = Snapshot(
            key,
            source_request_id,
            len(tokens),
            last_step_start,
            keys.key(last_step_start),
            tuple(tokens[last_step_start:]),
            blocks,
            freed_until,
        )
        self._by_key[key] = snapshot
        for block in _live(blocks):
            self._key_of_block[block.block_id] = key
        release(snapshot)

    def find(
        self, tokens: Sequence[int], request_salt: str, max_tokens: int
    ) -> tuple[Snapshot, int] | None:
        """The snapshot that resumes the most of ``tokens``, at most ``max_tokens`` of them.

        With how many tokens it resumes; ``None`` if none resumes a token.
        """
        starts = {
            s.last_step_start for s in self._by_key.values() if s.last_step_start <= max_tokens
        }
        if not starts:
            return None
        keys = self._keys(tokens[: max(starts)], request_salt)
        start_keys = {keys.key(start) for start in starts}
        best: tuple[Snapshot, int] | None = None
        for snapshot in self._by_key.values():
            if snapshot.start_key in start_keys:
                length = snapshot.resumable_length(tokens, max_tokens)
                if length and (best is None or length > best[1]):
                    best = (snapshot, length)
        return best

    def blocks_for(self, snapshot: Snapshot, length: int) -> tuple[tuple[Any, ...], ...]:
        """The snapshot's blocks that hold its first ``length`` tokens, in each group."""
        held = -(-length // self.block_size)
        return tuple(group[:held] for group in snapshot.blocks)

    def owner_of(self, block: Any) -> Snapshot | None:
        """The snapshot whose blocks include ``block``."""
        key = self._key_of_block.get(block.block_id)
        return None if key is None else self._by_key.get(key)

    def hand_over(self, snapshot: Snapshot, group: int) -> None:
        """Group ``group``'s blocks go to the request that resumes ``snapshot``.

        It leaves the store once every group has handed its blocks over (the
        KV managers do so one after the other, in the same scheduler call).
        """
        handed = self._handed_over.setdefault(snapshot.key, set())
        handed.add(group)
        if len(handed) == len(snapshot.blocks):
            self.drop(snapshot.key)

    def drop(self, key: bytes) -> Snapshot:
        snapshot = self._by_key.pop(key)
        self._handed_over.pop(key, None)
        for block in _live(snapshot.blocks):
            if self._key_of_block.get(block.block_id) == key:
                del self._key_of_block[block.block_id]
        return snapshot

    def block_reused(self, block_id: int) -> None:
        """One of a snapshot's blocks was handed out: the snapshot is gone."""
        key = self._key_of_block.get(block_id)
        if key is not None and key in self._by_key:
            self.drop(key)


def _live(blocks: tuple[tuple[Any, ...], ...]) -> list[Any]:
    return [block for group in blocks for block in group if not block.is_null]
