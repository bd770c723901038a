"""Streaming figures on vLLM's ``/metrics``.

The engine core's scheduler owns the figures and makes them once per step, next
to vLLM's own scheduler stats (:mod:`vllm_sink.scheduler.scheduler`); the API
server serves ``/metrics`` in another process. vLLM carries scheduler figures
to the front end in ``SchedulerStats``, a fixed dataclass with no room for a
plugin's numbers, so each engine core writes a handful of integers into a
small shared file named after its engine (a :class:`StreamingBoard`), and a
Prometheus collector in the front end reads its engines' boards at scrape time.

Two of vLLM's own mechanisms were weighed and not used. A
``vllm.stat_logger_plugins`` entry point turns stats on for every ``AsyncLLM``
in the environment, streaming or not and even under ``--disable-log-stats``,
and the offline engine ignores it. prometheus_client's multiprocess mode must
be chosen before prometheus_client is first imported in every process, and
changes how all of vLLM's own metrics are stored and aggregated.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BOARD_PREFIX, BOARD_SUFFIX = "vllm-sink-", ".metrics"
"""A board's file name: prefix, PID namespace, writer's process id, engine, suffix."""

SNAPSHOT_TIERS = ("pool", "host", "disk")
"""Where snapshots live (:mod:`vllm_sink.scheduler.snapshot_keeper`)."""
TIER_FIGURES = ("count", "bytes", "hits")

FIELDS = (
    "streams",
    "streams_evicting",
    "evicted_blocks",
    "resident_blocks",
    "resident_tokens",
    "max_resident_tokens",
    "longest_stream_tokens",
    "blocks_per_stream_limit",
    "snapshots",
    "snapshot_blocks",
    "snapshot_hits",
    "snapshot_misses",
    "snapshot_tokens_skipped",
    "prompts_cut",
    "prompt_tokens_cut",
    *(f"snapshot_{figure}_{tier}" for tier in SNAPSHOT_TIERS for figure in TIER_FIGURES),
    "snapshot_spills",
    "snapshot_spill_us",
    "snapshot_restore_us",
    "snapshot_disk_writes",
    "snapshot_disk_write_us",
    "snapshot_disk_read_us",
)
BOARD_BYTES = 8 * len(FIELDS)


def board_directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def engine_key(instance_id: str, engine_index: int) -> str:
    """Names one engine core in board file names: the config's instance id and its index."""
    return f"{instance_id}-{engine_index}"


class StreamingBoard:
    """A few int64 figures in a memory-mapped file, written by one engine core."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._values = np.memmap(path, dtype=np.int64, mode="r+", shape=(len(FIELDS),))

    @classmethod
    def create(cls, engine: str, directory: Path | None = None) -> StreamingBoard:
        """A zeroed board for ``engine`` (see :func:`engine_key`), removed when this process exits.

        Its name carries this process's id (and PID namespace), so that the
        next board created on the machine can remove it if this process dies
        without exiting (SIGKILL, OOM), when ``atexit`` never runs.
        """
        directory = directory or board_directory()
        remove_orphaned_boards(directory)
        path = directory / f"{_creator_prefix()}{os.getpid()}-{engine}{BOARD_SUFFIX}"
        path.write_bytes(bytes(BOARD_BYTES))
        atexit.register(_remove, path)
        return cls(path)

    def publish(self, figures: dict[str, int]) -> None:
        for name, value in figures.items():
            self._values[FIELDS.index(name)] = value


def open_board(engine: str, directory: Path | None = None) -> StreamingBoard | None:
    """The board an engine core created for ``engine``, for a second writer (its worker).

    ``None`` when there is none (stats off). The worker writes only fields
    the scheduler leaves alone.
    """
    instance_id, _, index = engine.rpartition("-")
    path = boards_of(instance_id, directory).get(index)
    return None if path is None else StreamingBoard(path)


def read_board(path: Path) -> dict[str, int] | None:
    """A board's figures, or ``None`` if it is gone or not written yet."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) != BOARD_BYTES:
        return None
    return dict(zip(FIELDS, (int(v) for v in np.frombuffer(data, dtype=np.int64))))


def boards_of(instance_id: str, directory: Path | None = None) -> dict[str, Path]:
    """Engine index -> board, for the engine cores of one engine config."""
    directory = directory or board_directory()
    found = {}
    for path in directory.glob(f"{_creator_prefix()}*-{instance_id}-*{BOARD_SUFFIX}"):
        engine = path.name.removesuffix(BOARD_SUFFIX).rpartition("-")[2]
        if engine.isdigit():
            found[engine] = path
    return found


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _creator_prefix() -> str:
    """``vllm-sink-<PID namespace>-``: process ids mean something only within one.

    Containers that share ``/dev/shm`` but not process ids (a pod's
    containers) never remove each other's boards.
    """
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{BOARD_PREFIX}{namespace}-"


def remove_orphaned_boards(directory: Path) -> None:
    """Remove the boards in ``directory`` that this PID namespace's dead processes left."""
    prefix = _creator_prefix()
    for path in directory.glob(f"{prefix}*{BOARD_SUFFIX}"):
        creator = path.name[len(prefix) :].partition("-")[0]
        if creator.isdigit() and not _process_exists(int(creator)):
            _remove(path)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


# name, Prometheus type, board field, help text
_METRICS = (
    ("vllm_sink:streams", "gauge", "streams",
     "Requests holding a streaming KV cache."),
    ("vllm_sink:streams_past_first_eviction", "gauge", "streams_evicting",
     "Streams that have outgrown sinks + window and evict as they advance."),
    ("vllm_sink:evicted_blocks", "counter", "evicted_blocks",
     "KV blocks returned to the block pool by advancing streams (every KV cache group)."),
    ("vllm_sink:resident_kv_blocks", "gauge", "resident_blocks",
     "KV blocks held by all streams now (every KV cache group)."),
    ("vllm_sink:resident_kv_tokens", "gauge", "resident_tokens",
     "KV cache tokens (sinks + window) held by all streams now."),
    ("vllm_sink:max_resident_kv_tokens_per_stream", "gauge", "max_resident_tokens",
     "Most KV cache tokens held by one stream now."),
    ("vllm_sink:longest_stream_tokens", "gauge", "longest_stream_tokens",
     "Tokens processed so far by the longest running stream."),
    ("vllm_sink:kv_blocks_per_stream_limit", "gauge", "blocks_per_stream_limit",
     "Most KV blocks one stream can hold, over its KV cache groups."),
    ("vllm_sink:snapshots", "gauge", "snapshots",
     "Finished streams kept for the requests that continue them."),
    ("vllm_sink:snapshot_kv_blocks", "gauge", "snapshot_blocks",
     "KV blocks held by snapshots (free blocks: live streams take them first)."),
    ("vllm_sink:snapshot_hits", "counter", "snapshot_hits",
     "New requests that continued a snapshot."),
    ("vllm_sink:snapshot_misses", "counter", "snapshot_misses",
     "New requests that continued no snapshot (streamed from their start)."),
    ("vllm_sink:snapshot_tokens_skipped", "counter", "snapshot_tokens_skipped",
     "Prompt tokens not prefilled because a snapshot held their KV."),
    ("vllm_sink:prompts_cut", "counter", "prompts_cut",
     "Prompts no snapshot resumed, computed as their sinks and last window only "
     "(--streaming-uncached-prompts window)."),
    ("vllm_sink:prompt_tokens_cut", "counter", "prompt_tokens_cut",
     "Tokens those prompts left out."),
    ("vllm_sink:snapshot_spills", "counter", "snapshot_spills",
     "Snapshots the KV cache gave up that were copied to host memory."),
    ("vllm_sink:snapshot_spill_seconds", "counter", "snapshot_spill_us",
     "Time the worker spent copying snapshots to host memory."),
    ("vllm_sink:snapshot_restore_seconds", "counter", "snapshot_restore_us",
     "Time the worker spent restoring snapshots from host memory or disk into the KV cache."),
    ("vllm_sink:snapshot_disk_writes", "counter", "snapshot_disk_writes",
     "Snapshot files written (one per tensor-parallel rank), in the background."),
    ("vllm_sink:snapshot_disk_write_seconds", "counter", "snapshot_disk_write_us",
     "Time spent writing snapshot files, in the background."),
    ("vllm_sink:snapshot_disk_read_seconds", "counter", "snapshot_disk_read_us",
     "Time the scheduler spent reading and checking snapshot files it restored."),
)  # fmt: skip
_TIER_METRICS = (
    ("vllm_sink:snapshot_tier_snapshots", "gauge", "count", "Snapshots held, by tier."),
    ("vllm_sink:snapshot_tier_bytes", "gauge", "bytes",
     "Bytes of KV held by snapshots, by tier (pool: free blocks live streams take first)."),
    ("vllm_sink:snapshot_tier_hits", "counter", "hits",
     "New requests that continued a snapshot, by the tier it was found in."),
)  # fmt: skip
_MICROSECONDS = {name for name in FIELDS if name.endswith("_us")}


class StreamingCollector:
    """Prometheus collector over the boards of this process's streaming engines.

    Engines are added as their configs are made (:func:`serve_streaming_metrics`);
    an engine whose cores have not written a board yet, or have stopped,
    shows nothing. Labelled like vLLM's own metrics: model name and engine index.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.engines: dict[str, str] = {}
        """Engine config instance id -> served model name."""

    def add_engine(self, instance_id: str, model_name: str) -> None:
        self.engines[instance_id] = model_name

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        boards = []
        for instance_id, model_name in self.engines.items():
            for engine, path in sorted(boards_of(instance_id, self.directory).items()):
                figures = read_board(path)
                if figures is not None:
                    boards.append(([model_name, engine], figures))
        for name, kind, field, documentation in _METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(name, documentation, labels=["model_name", "engine"])
            scale = 1e-6 if field in _MICROSECONDS else 1
            for labels, figures in boards:
                metric.add_metric(labels, figures[field] * scale)
            yield metric
        for name, kind, figure, documentation in _TIER_METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(name, documentation, labels=["model_name", "engine", "tier"])
            for labels, figures in boards:
                for tier in SNAPSHOT_TIERS:
                    metric.add_metric([*labels, tier], figures[f"snapshot_{figure}_{tier}"])
            yield metric

    def remove_boards(self) -> None:
        """Remove the boards of this process's engines (at exit).

        vLLM kills its engine cores when ``vllm serve`` stops, so their own
        ``atexit`` may never run; the front end outlives them.
        """
        for instance_id in self.engines:
            for path in boards_of(instance_id, self.directory).values():
                _remove(path)


_collector: StreamingCollector | None = None


def serve_streaming_metrics(instance_id: str, model_name: str) -> None:
    """Expose an engine's boards on this process's ``/metrics`` (the front end).

    With several API server processes (``--api-server-count``, which defaults
    to ``--data-parallel-size``), vLLM serves ``/metrics`` from prometheus_client's
    multiprocess files, which a collector cannot join: the figures are left out,
    with a warning saying how to get them.
    """
    global _collector
    if _collector is None:
        from prometheus_client import REGISTRY

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from vllm.logger import init_logger

            init_logger("vllm.vllm_sink").warning(
                "vllm-sink: the streaming figures are not on /metrics with several API "
                "server processes; pass --api-server-count 1 to have them (with "
                "--data-parallel-size, one per engine)"
            )
        _collector = StreamingCollector()
        REGISTRY.register(_collector)
        atexit.register(_collector.remove_boards)
    _collector.add_engine(instance_id, model_name)
