"""Streaming figures on vLLM's ``/metrics``.

The scheduler's KV cache manager (engine core process) owns the figures; the
API server (the front-end process) serves ``/metrics``. vLLM carries scheduler
figures to the front end in ``SchedulerStats``, a fixed dataclass with no room
for a plugin's numbers, so the manager writes a handful of integers into a small
shared file (a :class:`StreamingBoard`) and a Prometheus collector in the front
end reads them at scrape time. The front end creates the file when it builds
the engine config and hands its path to the engine core through the
environment, which engine processes inherit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BOARD_ENV = "VLLM_SINK_METRICS_BOARD"
"""Path of the current engine's board (set by the front end, read by the engine core)."""
BOARD_PREFIX, BOARD_SUFFIX = "vllm-sink-", ".metrics"
"""A board's file name: prefix, PID namespace, creator's process id, random part, suffix."""

FIELDS = (
    "streams",
    "streams_evicting",
    "evicted_blocks",
    "resident_blocks",
    "resident_tokens",
    "max_resident_tokens",
    "longest_stream_tokens",
    "blocks_per_stream_limit",
)


class StreamingBoard:
    """A few int64 figures in a memory-mapped file: one writer, any readers."""

    def __init__(self, path: Path, writable: bool) -> None:
        self.path = path
        self._values = np.memmap(
            path, dtype=np.int64, mode="r+" if writable else "r", shape=(len(FIELDS),)
        )

    @classmethod
    def create(cls) -> StreamingBoard:
        """A zeroed board in shared memory, removed when this process exits.

        Its name carries this process's id (and PID namespace), so that the
        next board created on the machine can remove it if this process dies
        without exiting (SIGKILL, OOM), when ``atexit`` never runs.
        """
        shm = Path("/dev/shm")
        directory = shm if shm.is_dir() else Path(tempfile.gettempdir())
        remove_orphaned_boards(directory)
        fd, name = tempfile.mkstemp(
            prefix=f"{_creator_prefix()}{os.getpid()}-", suffix=BOARD_SUFFIX, dir=directory
        )
        with os.fdopen(fd, "wb") as file:
            file.write(bytes(8 * len(FIELDS)))
        atexit.register(_remove, Path(name))
        return cls(Path(name), writable=True)

    @classmethod
    def from_environment(cls) -> StreamingBoard | None:
        """The board the front end created for this engine, if any."""
        path = os.environ.get(BOARD_ENV)
        if not path or not Path(path).exists():
            return None
        return cls(Path(path), writable=True)

    def publish(self, **figures: int) -> None:
        for name, value in figures.items():
            self._values[FIELDS.index(name)] = value

    def read(self) -> dict[str, int]:
        return {name: int(value) for name, value in zip(FIELDS, self._values)}


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
     "Window KV blocks returned to the block pool by advancing streams."),
    ("vllm_sink:resident_kv_blocks", "gauge", "resident_blocks",
     "KV blocks held by all streams now."),
    ("vllm_sink:resident_kv_tokens", "gauge", "resident_tokens",
     "KV cache tokens (sinks + window) held by all streams now."),
    ("vllm_sink:max_resident_kv_tokens_per_stream", "gauge", "max_resident_tokens",
     "Most KV cache tokens held by one stream now."),
    ("vllm_sink:longest_stream_tokens", "gauge", "longest_stream_tokens",
     "Tokens processed so far by the longest running stream."),
    ("vllm_sink:kv_blocks_per_stream_limit", "gauge", "blocks_per_stream_limit",
     "Most KV blocks one stream can hold (sinks + window + slack)."),
)  # fmt: skip


class StreamingCollector:
    """Prometheus collector that reads a board at scrape time."""

    def __init__(self, board: StreamingBoard, model_name: str, engine: str = "0") -> None:
        self.board = board
        self.labels = {"model_name": model_name, "engine": engine}

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = self.board.read()
        for name, kind, field, documentation in _METRICS:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(name, documentation, labels=list(self.labels))
            metric.add_metric(list(self.labels.values()), figures[field])
            yield metric


_registered: StreamingCollector | None = None


def publish_streaming_metrics(model_name: str) -> StreamingBoard:
    """Create this engine's board and expose it on this process's ``/metrics``.

    Called in the front end while the engine config is built, before engine
    processes start (they inherit the board's path). One engine per process is
    exposed: a later engine replaces the earlier one's collector.
    """
    global _registered
    from prometheus_client import REGISTRY

    board = StreamingBoard.create()
    os.environ[BOARD_ENV] = str(board.path)
    if _registered is not None:
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(_registered)
    _registered = StreamingCollector(board, model_name)
    REGISTRY.register(_registered)
    return board
