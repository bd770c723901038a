"""Patch: the ``--streaming-*`` flags on vLLM's CLI.

Targets (vLLM 0.32.0, ``vllm/engine/arg_utils.py``):
  * ``EngineArgs.add_cli_args`` (staticmethod): adds a "Streaming (vllm-sink)"
    argument group. Every command built on engine args goes through it
    (``vllm serve``, ``vllm bench throughput|latency|serve``), and vLLM loads
    general plugins before building those parsers.
  * ``EngineArgs.from_cli_args`` (classmethod): copies only dataclass fields,
    so the flags are folded into ``additional_config`` here.
Why no hook: vLLM has no plugin hook to add engine arguments; the platform's
``pre_register_and_update(parser)`` belongs to the active platform only.
Without the flags the same settings work unpatched through
``--additional-config '{"streaming_sinks": 4, "streaming_window": 1020}'``.
"""

from __future__ import annotations

import argparse
import functools

from vllm_sink.config import (
    DEFAULT_DIR_SIZE,
    DEFAULT_SINKS,
    DEFAULT_SNAPSHOTS,
    DEFAULT_WINDOW,
    DIR_KEY,
    DIR_SIZE_KEY,
    HOST_SIZE_KEY,
    SINKS_KEY,
    SNAPSHOTS_KEY,
    UNCACHED_KEY,
    UNCACHED_MODES,
    WINDOW_KEY,
)

GROUP_TITLE = "Streaming (vllm-sink)"


def add_streaming_arguments(parser: argparse.ArgumentParser) -> None:
    if "--streaming-sinks" in parser._option_string_actions:
        return
    group = parser.add_argument_group(
        GROUP_TITLE,
        "StreamingLLM attention sinks: every token attends the first S tokens plus "
        "a window of at least W recent tokens, with RoPE positions inside the cache, "
        "so streams run far past the model's context in bounded KV memory. Giving "
        "--streaming-sinks or --streaming-window turns streaming on.",
    )
    group.add_argument(
        "--streaming-sinks",
        type=int,
        default=None,
        metavar="S",
        help=f"Number of initial tokens kept as attention sinks (default {DEFAULT_SINKS} "
        "when streaming is on; 0 gives plain window attention).",
    )
    group.add_argument(
        "--streaming-window",
        type=int,
        default=None,
        metavar="W",
        help=f"Least number of recent tokens every token attends (default "
        f"{DEFAULT_WINDOW}). Evictions are whole KV blocks, so a decoding token "
        "sees up to block_size-1 more.",
    )
    group.add_argument(
        "--streaming-snapshots",
        type=int,
        default=None,
        metavar="N",
        help=f"Finished streams kept so that a request continuing one (a chat's next "
        f"turn) prefills only its new tokens (default {DEFAULT_SNAPSHOTS}; 0 keeps none). "
        "Their KV blocks count as free: live streams take them first.",
    )
    group.add_argument(
        "--streaming-snapshot-host-size",
        type=float,
        default=None,
        metavar="GiB",
        help="Host memory for the snapshots the KV cache gives up (a block handed to a "
        "live stream, or more than --streaming-snapshots), least recently used out "
        "first; a request that continues one has it restored instead of streaming its "
        "history again. Summed over tensor-parallel ranks, like --kv-offloading-size "
        "(default 0: off).",
    )
    group.add_argument(
        "--streaming-snapshot-dir",
        type=str,
        default=None,
        metavar="PATH",
        help="A directory where every snapshot is also written (in the background, one file "
        "per tensor-parallel rank, readable by this user only), so that a restarted server, "
        "or any replica sharing the directory, resumes the conversations it holds. Files are "
        "used only by engines with the same weights and settings, and only once checked.",
    )
    group.add_argument(
        "--streaming-snapshot-dir-size",
        type=float,
        default=None,
        metavar="GiB",
        help=f"Disk the snapshot files may take, least recently used removed first (default "
        f"{DEFAULT_DIR_SIZE:g}; 0 keeps none).",
    )
    group.add_argument(
        "--streaming-uncached-prompts",
        choices=UNCACHED_MODES,
        default=None,
        help="How a prompt longer than sinks + window that no snapshot resumes is computed: "
        "'stream' streams all of it (default); 'window' computes its first S tokens and its "
        "last W only, as if the tokens between had been evicted (the paper's sliding window "
        "with re-computation), so a conversation whose snapshot is gone costs O(W) to resume "
        "instead of O(history). Requests asking for prompt log-probabilities are streamed.",
    )


def fold_into_additional_config(engine_args, args: argparse.Namespace) -> None:
    values = {
        SINKS_KEY: getattr(args, "streaming_sinks", None),
        WINDOW_KEY: getattr(args, "streaming_window", None),
        SNAPSHOTS_KEY: getattr(args, "streaming_snapshots", None),
        HOST_SIZE_KEY: getattr(args, "streaming_snapshot_host_size", None),
        DIR_KEY: getattr(args, "streaming_snapshot_dir", None),
        DIR_SIZE_KEY: getattr(args, "streaming_snapshot_dir_size", None),
        UNCACHED_KEY: getattr(args, "streaming_uncached_prompts", None),
    }
    values = {key: value for key, value in values.items() if value is not None}
    if values:
        engine_args.additional_config = {**(engine_args.additional_config or {}), **values}


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    @functools.wraps(original_add)
    def add_cli_args(parser):
        parser = original_add(parser)
        add_streaming_arguments(parser)
        return parser

    @functools.wraps(original_from)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from(cls, args)
        fold_into_additional_config(engine_args, args)
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
