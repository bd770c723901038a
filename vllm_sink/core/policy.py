"""Which KV blocks a stream keeps and which RoPE positions its tokens get.

Pure arithmetic, shared by the scheduler side (which blocks to free) and the
worker side (which blocks to re-rotate, the compact block table, positions), so
the two can never disagree and need no extra messages between processes.

Layout of one stream in vLLM's paged cache (``bs`` = block size, ``S`` sinks):

* block 0 of the request is the *head block*, pinned for the life of the
  request. Its first ``S`` slots hold the sink tokens (the first ``S`` tokens of
  the stream). Its other ``bs - S`` slots hold the ``bs - S`` tokens that come
  right before the first window block. Before any eviction that is simply the
  original text; at each eviction those slots are refilled from the tail of
  the last evicted block (which keys are rotated then: RoPE positions, below).
* after ``ev`` evictions, absolute blocks ``1 .. ev`` are gone from the window
  (block ``ev`` is still held: it was the source of the head refill, and is
  freed at the next eviction), and the window is absolute blocks ``ev+1 ..``.

The attention kernel therefore sees the compact table
``[head, block ev+1, block ev+2, ...]``: an ordinary contiguous sequence of
``num_tokens - ev * bs`` tokens made of exactly ``S`` sinks plus the most recent
tokens. Token ``a`` (not a sink) sits at cache position ``a - ev * bs``; sinks
sit at ``0 .. S-1``. Every query therefore sees its window at true relative
distances and the sinks right before the window, as in StreamingLLM.

Eviction rule: before a step that starts with ``n`` computed tokens,
``ev(n) = max(0, (n + 1 - S - W) // bs)``. The first query of the step (absolute
position ``n``) then attends ``S`` sinks plus ``W .. W + bs - 1`` recent tokens
(itself included). A query ``i`` tokens later in the same prefill chunk attends
``i`` more, so the slack above ``W`` is at most ``bs - 1`` for decoding and
``bs - 1 + C - 1`` for a prefill chunk of ``C`` tokens.

RoPE positions: the token at cache index ``i`` gets RoPE position ``i + offset``.
Attention under RoPE depends only on differences of positions, so any common
offset gives the same result, and a well-chosen one saves work: with
``offset = shift mod R`` (``R`` a multiple of ``bs``), an eviction that does not
cross a multiple of ``R`` moves the window's indices down by ``d`` and the offset
up by ``d``, so window keys keep their positions and only the ``S`` sink keys
move. Every ``R / bs`` evictions the offset drops back and the window is
re-rotated once. ``R`` is as large as the model's RoPE table allows, up to
:data:`ROPE_SPANS` cache spans (:meth:`rebase_period_blocks`); ``R = bs``
(offset always 0) re-rotates the window at every eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

ROPE_SPANS = 4
"""Positions stay below this many cache spans, even where the RoPE table is longer.

Rotation angles are position x frequency in float32, so their rounding grows
with the position: a stream whose cache spans 2k positions has no reason to use
positions near 128k just because the model's table reaches them. Four spans
already re-rotate the window at most once per three spans of evictions.
"""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SinkWindowPolicy:
    """The sink + window rule for one engine (all streams share it)."""

    sinks: int
    """S: the first tokens every query attends (their KV is pinned)."""
    window: int
    """W: the least number of most recent tokens every query attends."""
    block_size: int
    """vLLM's KV block size in tokens."""
    max_chunk_tokens: int
    """The most tokens one request can bring in one step (prefill chunk)."""

    def __post_init__(self) -> None:
        if not 0 <= self.sinks <= self.block_size:
            raise ValueError(
                f"streaming sinks ({self.sinks}) must be between 0 and the KV "
                f"block size ({self.block_size})"
            )
        if self.window < self.block_size:
            raise ValueError(
                f"streaming window ({self.window}) must be at least the KV block "
                f"size ({self.block_size}); raise --streaming-window or lower "
                "--block-size"
            )
        if self.max_chunk_tokens < 1:
            raise ValueError("max_chunk_tokens must be positive")

    # ----------------------------------------------------------------- eviction
    def evicted_blocks(self, num_computed_tokens: int) -> int:
        """Window blocks evicted before a step starting at ``num_computed_tokens``."""
        spare = num_computed_tokens + 1 - self.sinks - self.window
        return max(0, spare // self.block_size)

    def freeable_block_range(self, num_computed_tokens: int) -> tuple[int, int]:
        """Request block indices ``[first, last)`` the scheduler may free.

        The newest evicted block is kept one eviction longer: the worker reads
        its tail to refill the head block in the same step the eviction
        happens, and the scheduler may hand freed blocks to other requests
        before that step runs.
        """
        return 1, self.evicted_blocks(num_computed_tokens)

    def sliding_first_held_block(self, num_computed_tokens: int, sliding_window: int) -> int:
        """First window block a sliding-window layer still reads in a step starting at ``n``.

        A layer that attends only its last ``sliding_window`` tokens (Gemma 3's
        local layers) reads no key before ``n - sliding_window + 1`` from this
        step on: blocks ``1 ..`` this one ``- 1`` can be freed in its KV cache
        group, as vLLM's own sliding-window manager frees them. The head block
        stays, so that the group's block rows keep the compact layout.
        """
        return max(1, (num_computed_tokens - sliding_window + 1) // self.block_size)

    def sliding_max_resident_blocks(self, sliding_window: int) -> int:
        """Most KV blocks one stream holds in a sliding-window layer group.

        The head block + the blocks of up to ``sliding_window - 1`` tokens before a
        step and the step's ``C`` tokens, which may straddle one more block
        boundary; never more than the full-attention bound.
        """
        span = sliding_window + self.max_chunk_tokens - 2
        return min(self.max_resident_blocks, span // self.block_size + 3)

    # ---------------------------------------------------------------- positions
    def position_shift(self, num_computed_tokens: int) -> int:
        """How far left (in tokens) non-sink tokens sit in the cache."""
        return self.evicted_blocks(num_computed_tokens) * self.block_size

    def attended_window_start(self, num_computed_tokens: int) -> int:
        """First non-sink token attended by queries of a step starting at ``n``.

        Before the first eviction this is ``S`` (all history is attended).
        """
        return self.position_shift(num_computed_tokens) + self.sinks

    # ------------------------------------------------------------------- bounds
    @property
    def max_cached_tokens(self) -> int:
        """The most tokens the kernel sees for one request (sinks + window + slack)."""
        return self.sinks + self.window + self.block_size + self.max_chunk_tokens - 2

    @property
    def view_width(self) -> int:
        """Tokens the worker keeps per stream: the cache plus the token just sampled."""
        return self.max_cached_tokens + 1

    @property
    def max_position(self) -> int:
        """The largest cache index a token or key is given (RoPE position without offset)."""
        return self.max_cached_tokens - 1

    def rebase_period_blocks(self, rope_positions: int) -> int:
        """``R / bs``: evictions between re-rotations of the window.

        The largest period whose positions (``max_position`` plus an offset of
        up to ``R - bs``) stay within a RoPE table of ``rope_positions`` and
        below :data:`ROPE_SPANS` cache spans.
        """
        limit = min(rope_positions, ROPE_SPANS * self.max_cached_tokens)
        return max(1, (limit - self.max_cached_tokens) // self.block_size + 1)

    def rope_offset(self, shift: int, period_blocks: int) -> int:
        """RoPE position of cache index 0 for a stream that has evicted ``shift`` tokens."""
        return shift // self.block_size % period_blocks * self.block_size

    @property
    def max_window_slack(self) -> int:
        """Most tokens above W that a query may attend (prefill chunks included)."""
        return self.block_size - 1 + self.max_chunk_tokens - 1

    @property
    def max_decode_window_slack(self) -> int:
        """Most tokens above W that a decoding query attends."""
        return self.block_size - 1

    @property
    def max_resident_blocks(self) -> int:
        """Most KV blocks one stream holds at any time.

        Head block + the held source block + the window blocks covering at most
        ``S + W + C - 2`` tokens past the held block's end.
        """
        return 2 + _cdiv(self.sinks + self.window + self.max_chunk_tokens - 2, self.block_size)
