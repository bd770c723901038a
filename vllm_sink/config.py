"""The user's streaming settings, read from vLLM's ``additional_config``.

``--streaming-sinks`` / ``--streaming-window`` on the command line and
``LLM(..., additional_config={"streaming_sinks": 4, "streaming_window": 1020})``
offline both end up as these two keys, so this is the one place they are parsed
and checked. Streaming is on when either key is present.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_sink.core.policy import SinkWindowPolicy

if TYPE_CHECKING:
    from vllm.config import VllmConfig

SINKS_KEY = "streaming_sinks"
WINDOW_KEY = "streaming_window"
SNAPSHOTS_KEY = "streaming_snapshots"
HOST_SIZE_KEY = "streaming_snapshot_host_size"
DIR_KEY = "streaming_snapshot_dir"
DIR_SIZE_KEY = "streaming_snapshot_dir_size"
UNCACHED_KEY = "streaming_uncached_prompts"
ALL_KEYS = (
    SINKS_KEY, WINDOW_KEY, SNAPSHOTS_KEY, HOST_SIZE_KEY, DIR_KEY, DIR_SIZE_KEY, UNCACHED_KEY
)  # fmt: skip
KEY_PREFIX = "streaming_"
"""additional_config keys with this prefix are vllm-sink's: unknown ones are refused."""

DEFAULT_SINKS = 4
"""The paper's choice: four initial tokens recover window attention's perplexity."""
DEFAULT_WINDOW = 1020
"""The paper's main setting (4 sinks + 1020 recent tokens, a 1024-token cache)."""
DEFAULT_SNAPSHOTS = 64
"""Finished streams kept in the KV pool for the requests that continue them (see
``scheduler.snapshots``).

Their KV blocks count as free (live streams take them, least recently used
first), so the number only bounds bookkeeping: the worker keeps each one's sink
keys (``S x layers x KV heads x head size`` values, 92 KB for SmolLM2 in float32).
"""
UNCACHED_MODES = ("stream", "window")
"""How a prompt longer than sinks + window that no snapshot resumes is computed: every
token streamed (the exact stream), or its sinks and last window only (O(W), see
:mod:`vllm_sink.core.uncached_prompts`)."""
GIB = 2**30
DEFAULT_DIR_SIZE = 16.0
"""GiB of disk for snapshot files when a directory is given: about 270 SmolLM2 snapshots
in float32 at 4 + 1020, whatever their histories' lengths."""
UNLIMITED_STREAM_LEN = 2**40
"""``max_model_len`` when the user gives none: streams have no length limit.

About 1.1e12 tokens: 127 days of one stream at 100,000 tokens/s. The worker holds each
stream in its compact view, so nothing is sized by this number, but vLLM
multiplies it: ``kv_cache_size_tokens = max concurrency x max_model_len`` is
sent between processes as a 64-bit integer, which stays below 2**63 for pools
of up to 2**23 full-size streams (at 2**53, 1,024 streams overflow it).
"""


class StreamingConfigError(ValueError):
    """A streaming setting that cannot work; the message says what to change."""


@dataclass(frozen=True)
class StreamingSettings:
    sinks: int = DEFAULT_SINKS
    window: int = DEFAULT_WINDOW
    snapshots: int = DEFAULT_SNAPSHOTS
    host_size: float = 0.0
    """GiB of host memory (over all tensor-parallel ranks) for snapshots the pool gives up."""
    directory: str | None = None
    """Where snapshots are written, to outlive the engine and reach other replicas."""
    dir_size: float = DEFAULT_DIR_SIZE
    """GiB of disk the directory's files of this engine may take (0: the disk tier is off)."""
    uncached_prompts: str = UNCACHED_MODES[0]
    """One of :data:`UNCACHED_MODES`."""

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | Any | None
    ) -> StreamingSettings | None:
        """Parse the streaming keys; ``None`` when streaming is off."""
        if not isinstance(additional_config, Mapping):
            return None
        unknown = sorted(
            str(key)
            for key in additional_config
            if str(key).startswith(KEY_PREFIX) and key not in ALL_KEYS
        )
        if unknown:
            raise StreamingConfigError(
                f"unknown streaming setting {', '.join(map(repr, unknown))} in "
                f"additional_config; the settings are {', '.join(map(repr, ALL_KEYS))}"
            )
        if SINKS_KEY not in additional_config and WINDOW_KEY not in additional_config:
            for key in ALL_KEYS:
                if key in additional_config:
                    raise StreamingConfigError(
                        f"{_name(key)} applies to streaming: add --streaming-sinks "
                        "or --streaming-window"
                    )
            return None
        sinks = _as_int(additional_config.get(SINKS_KEY, DEFAULT_SINKS), SINKS_KEY)
        window = _as_int(additional_config.get(WINDOW_KEY, DEFAULT_WINDOW), WINDOW_KEY)
        if sinks < 0:
            raise StreamingConfigError(
                f"{_name(SINKS_KEY)} must be 0 or more (got {sinks}); the paper uses 4"
            )
        if window < 1:
            raise StreamingConfigError(
                f"{_name(WINDOW_KEY)} must be at least 1 (got {window}); "
                f"for example {DEFAULT_WINDOW}"
            )
        snapshots = _as_int(additional_config.get(SNAPSHOTS_KEY, DEFAULT_SNAPSHOTS), SNAPSHOTS_KEY)
        if snapshots < 0:
            raise StreamingConfigError(
                f"{_name(SNAPSHOTS_KEY)} must be 0 (none kept) or more (got {snapshots})"
            )
        host_size = _as_size(additional_config.get(HOST_SIZE_KEY, 0), HOST_SIZE_KEY)
        if host_size and not snapshots:
            raise StreamingConfigError(
                f"{_name(HOST_SIZE_KEY)} holds snapshots: it needs --streaming-snapshots above 0"
            )
        directory = additional_config.get(DIR_KEY)
        if directory is not None and (not isinstance(directory, str) or not directory.strip()):
            raise StreamingConfigError(f"{_name(DIR_KEY)} must be a path (got {directory!r})")
        dir_size = _as_size(additional_config.get(DIR_SIZE_KEY, DEFAULT_DIR_SIZE), DIR_SIZE_KEY)
        if DIR_SIZE_KEY in additional_config and directory is None:
            raise StreamingConfigError(
                f"{_name(DIR_SIZE_KEY)} is the budget of --streaming-snapshot-dir: give the "
                "directory too"
            )
        for key, value in ((HOST_SIZE_KEY, host_size), (DIR_KEY, directory)):
            if value and not snapshots:
                raise StreamingConfigError(
                    f"{_name(key)} holds snapshots: it needs --streaming-snapshots above 0"
                )
        uncached = additional_config.get(UNCACHED_KEY, UNCACHED_MODES[0])
        if uncached not in UNCACHED_MODES:
            raise StreamingConfigError(
                f"{_name(UNCACHED_KEY)} must be one of {', '.join(UNCACHED_MODES)} "
                f"(got {uncached!r})"
            )
        return cls(sinks, window, snapshots, host_size, directory, dir_size, uncached)


def _name(key: str) -> str:
    """How a setting is named in messages: its flag and its additional_config key."""
    return f"--{key.replace('_', '-')} ({key!r} in additional_config)"


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise StreamingConfigError(f"{_name(key)} must be an integer (got {value!r})")
    try:
        return int(value)
    except ValueError:
        raise StreamingConfigError(f"{_name(key)} must be an integer (got {value!r})") from None


def _as_size(value: Any, key: str) -> float:
    """A size in GiB: a finite number, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise StreamingConfigError(f"{_name(key)} must be a size in GiB (got {value!r})")
    try:
        size = float(value)
    except ValueError:
        raise StreamingConfigError(f"{_name(key)} must be a size in GiB (got {value!r})") from None
    if not math.isfinite(size) or size < 0:
        raise StreamingConfigError(f"{_name(key)} must be 0 (off) or more GiB (got {value!r})")
    return size


def streaming_settings(vllm_config: VllmConfig) -> StreamingSettings:
    """The engine's streaming settings (front end, scheduler and worker read them here)."""
    settings = StreamingSettings.from_additional_config(vllm_config.additional_config)
    if settings is None:
        raise StreamingConfigError("streaming is not enabled in additional_config")
    return settings


def streaming_policy(vllm_config: VllmConfig) -> SinkWindowPolicy:
    """The engine's sink + window rule: the settings plus vLLM's block and chunk sizes.

    The scheduler's KV manager reads the same policy from the KV cache spec the
    worker built from it.
    """
    settings = streaming_settings(vllm_config)
    try:
        return SinkWindowPolicy(
            sinks=settings.sinks,
            window=settings.window,
            block_size=vllm_config.cache_config.block_size,
            max_chunk_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        )
    except ValueError as error:
        raise StreamingConfigError(str(error)) from None
