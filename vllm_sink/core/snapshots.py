"""Finished streams kept for the requests that continue them: what a snapshot is, and finding one.

When a stream's request ends, its cache (head block, resident window blocks)
holds the exact state of a stream over its first ``N`` tokens. That state is
kept as a :class:`Snapshot`, keyed by those tokens
(:mod:`vllm_sink.core.token_prefix`); a new request whose prompt begins with
them resumes the stream and prefills only the rest.

A snapshot also resumes shorter prompts. Evictions are decided at the start of
each step and change the cache only there, so the cache over the first ``L``
tokens, for any ``L`` from the start of the step that last changed it
(:attr:`Snapshot.resumable_from`) to ``N``, is the state of a stream cut at
``L``. A reply that a client re-tokenizes differently near its end, or a
regenerated last turn, resumes there and recomputes the rest; a stream that
never evicted resumes at any length.

A snapshot of a cut prompt (:mod:`vllm_sink.core.uncached_prompts`) is keyed
by the whole tokens and records how many it skipped: its token counts are the
whole tokens', its rows and shift the stream's.

A snapshot never changes once made: a request that resumes it gets a copy of
its blocks, so a regenerate, an edited message, a second tab and ``n > 1``
samples all resume from the same one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_sink.core.token_prefix import PrefixKeys

RESUME_KEY = "vllm_sink_resume"
"""``extra_args`` entry the scheduler gives a request that continues a snapshot, for the
worker: ``(snapshot id, the stream's shift)``."""


def resume_source(params: Any) -> tuple[str, int] | None:
    """The :data:`RESUME_KEY` entry of a request's sampling parameters, if it has one."""
    extra = (params.extra_args or {}) if params is not None else {}
    if RESUME_KEY not in extra:
        return None
    snapshot_id, shift = extra[RESUME_KEY]
    return str(snapshot_id), int(shift)


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    """Its key, shortened: the worker keeps its state under this id."""
    key: bytes
    """The key of the tokens it covers (:class:`~vllm_sink.core.token_prefix.PrefixKeys`)."""
    num_tokens: int
    """``N``: tokens whose KV it holds."""
    resumable_from: int
    """The fewest tokens it resumes: the start of the step that last changed the cache."""
    start_key: bytes
    """The key of the first :attr:`resumable_from` tokens."""
    tail_tokens: tuple[int, ...]
    """Its tokens from :attr:`resumable_from` on."""
    shift: int
    """Tokens evicted after the sinks (the worker's ``StreamState.shift``)."""
    row_length: int
    """Blocks in each KV cache group's row: ``ceil(N / block_size)``."""
    freed_until: tuple[int, ...]
    """Per group, the row index below which blocks after the head were freed."""
    skipped: int = 0
    """Tokens after the sinks the stream never computed (a cut prompt's); ``resumable_from``
    is past them."""

    def stream_length(self, length: int) -> int:
        """Tokens of its stream that the first ``length`` of its tokens make."""
        return length - self.skipped

    def resumable_length(self, tokens: Sequence[int], max_tokens: int) -> int:
        """Tokens of ``tokens`` (whose first :attr:`resumable_from` match) it resumes."""
        length = self.resumable_from
        for ours, theirs in zip(self.tail_tokens, tokens[length:max_tokens]):
            if ours != theirs:
                break
            length += 1
        return length

    def live_blocks(self, group: int) -> list[int]:
        """Row indices of the group's blocks that hold KV: the head, then the window."""
        return [0, *range(self.freed_until[group], self.row_length)]


class SnapshotIndex:
    """Snapshots by key, least recently used first.

    Keys are salted with the engine's ``salt`` (model and streaming settings: a
    cache is only valid under the policy that built it) and the request's own
    (its ``cache_salt``, vLLM's per-request isolation of cached KV, and its
    LoRA adapter).
    """

    def __init__(self, block_size: int, salt: bytes) -> None:
        self.block_size = block_size
        self.salt = salt
        self._by_key: OrderedDict[bytes, Snapshot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Snapshot]:
        """Least recently used first."""
        return iter(self._by_key.values())

    def keys(self, tokens: Sequence[int], request_salt: str) -> PrefixKeys:
        return PrefixKeys(tokens, self.block_size, self.salt + request_salt.encode())

    def make(
        self,
        tokens: Sequence[int],
        request_salt: str,
        resumable_from: int,
        shift: int,
        freed_until: tuple[int, ...],
        skipped: int = 0,
    ) -> Snapshot:
        keys = self.keys(tokens, request_salt)
        key = keys.key(len(tokens))
        return Snapshot(
            snapshot_id=key.hex()[:32],
            key=key,
            num_tokens=len(tokens),
            resumable_from=resumable_from,
            start_key=keys.key(resumable_from),
            tail_tokens=tuple(tokens[resumable_from:]),
            shift=shift,
            row_length=-(-(len(tokens) - skipped) // self.block_size),
            freed_until=freed_until,
            skipped=skipped,
        )

    def add(self, snapshot: Snapshot) -> Snapshot | None:
        """Index ``snapshot``; returns the one it replaces (same tokens and salt), if any."""
        replaced = self._by_key.pop(snapshot.key, None)
        self._by_key[snapshot.key] = snapshot
        return replaced

    def get(self, key: bytes) -> Snapshot | None:
        return self._by_key.get(key)

    def remove(self, key: bytes) -> Snapshot | None:
        return self._by_key.pop(key, None)

    def used(self, snapshot: Snapshot) -> None:
        """``snapshot`` was just resumed: it is the most recently used."""
        if snapshot.key in self._by_key:
            self._by_key.move_to_end(snapshot.key)

    def candidates(
        self, tokens: Sequence[int], request_salt: str, max_tokens: int
    ) -> list[tuple[Snapshot, int]]:
        """Every snapshot that resumes some of ``tokens`` (at most ``max_tokens`` of them), with
        how many: the most tokens first, the most recently used first among equals."""
        starts = {s.resumable_from for s in self._by_key.values() if s.resumable_from <= max_tokens}
        if not starts:
            return []
        keys = self.keys(tokens[: max(starts)], request_salt)
        start_keys = {keys.key(start) for start in starts}
        found = []
        for snapshot in reversed(self._by_key.values()):
            if snapshot.start_key in start_keys:
                length = snapshot.resumable_length(tokens, max_tokens)
                if length:
                    found.append((snapshot, length))
        return sorted(found, key=lambda candidate: -candidate[1])  # stable: recency kept

    def find(
        self, tokens: Sequence[int], request_salt: str, max_tokens: int
    ) -> tuple[Snapshot, int] | None:
        """The snapshot that resumes the most of ``tokens`` (:meth:`candidates`' first)."""
        found = self.candidates(tokens, request_salt, max_tokens)
        return found[0] if found else None
