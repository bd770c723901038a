"""The /metrics board: the scheduler's figures as the API server's collector sees them."""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.metrics import (
    StreamingBoard,
    StreamingCollector,
    engine_key,
    remove_orphaned_boards,
)
from vllm_sink.scheduler.kv_cache import StreamingManagers
from vllm_sink_dev.kv_managers import make_manager, owned, step


def test_collector_exposes_its_engines_boards(tmp_path):
    """Each engine core's board under its engine index; other engines' boards are not read."""
    first = StreamingBoard.create(engine_key("1234", 0), tmp_path)
    second = StreamingBoard.create(engine_key("1234", 1), tmp_path)
    elsewhere = StreamingBoard.create(engine_key("999", 0), tmp_path)
    first.publish({"streams": 3, "evicted_blocks": 41, "max_resident_tokens": 1100})
    second.publish({"streams": 5})
    elsewhere.publish({"streams": 7})
    collector = StreamingCollector(tmp_path)
    collector.add_engine("1234", model_name="m")
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'vllm_sink:streams{engine="0",model_name="m"} 3.0' in text
    assert 'vllm_sink:streams{engine="1",model_name="m"} 5.0' in text
    assert "7.0" not in text
    assert 'vllm_sink:evicted_blocks_total{engine="0",model_name="m"} 41.0' in text
    assert "# TYPE vllm_sink:evicted_blocks_total counter" in text
    assert 'vllm_sink:max_resident_kv_tokens_per_stream{engine="0",model_name="m"} 1100.0' in text

    collector.remove_boards()  # the front end at exit: its engines' boards only
    assert not first.path.exists() and not second.path.exists() and elsewhere.path.exists()
    assert "vllm_sink:streams{" not in generate_latest(registry).decode()


def test_manager_figures_count_its_streams():
    policy = SinkWindowPolicy(sinks=4, window=64, block_size=32, max_chunk_tokens=96)
    manager, _ = make_manager(policy, num_blocks=64)
    lengths = {"long": 0, "short": 0}
    for new_tokens in [96] * 10:  # "long" grows to 960 tokens, "short" stays at 40
        step(manager, "long", lengths["long"], new_tokens)
        lengths["long"] += new_tokens
    step(manager, "short", 0, 40)
    manager.remove_skipped_blocks("long", lengths["long"])
    manager.remove_skipped_blocks("short", 40)

    figures = StreamingManagers([manager]).figures()
    # The long stream holds its 4 sinks plus tokens from the first one past its
    # evicted blocks: 960 - 4 - 64 + 1 = 893 spare positions, 27 whole blocks.
    long_resident = 960 - 27 * 32
    assert figures["streams"] == 2 and figures["streams_evicting"] == 1
    assert figures["resident_tokens"] == long_resident + 40
    assert figures["max_resident_tokens"] == long_resident
    assert figures["longest_stream_tokens"] == 960
    assert figures["resident_blocks"] == len(owned(manager, "long")) + len(owned(manager, "short"))
    assert figures["evicted_blocks"] == manager.num_evicted_blocks > 0

    manager.free("long")
    manager.free("short")
    figures = StreamingManagers([manager]).figures()
    assert not StreamingManagers([manager]).has_streams
    assert figures["streams"] == figures["resident_blocks"] == figures["resident_tokens"] == 0
    assert figures["evicted_blocks"] > 0  # a counter: it outlives the streams


def test_boards_of_dead_processes_are_removed(tmp_path):
    """A process killed before ``atexit`` leaves its board; the next one created sweeps it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    namespace = os.stat("/proc/self/ns/pid").st_ino
    orphan = tmp_path / f"vllm-sink-{namespace}-{int(dead.stdout)}-abc.metrics"
    mine = tmp_path / f"vllm-sink-{namespace}-{os.getpid()}-def.metrics"
    elsewhere = tmp_path / f"vllm-sink-{namespace + 1}-{int(dead.stdout)}-ghi.metrics"
    unnamed = tmp_path / "vllm-sink-xyz.metrics"  # no creator in the name: left alone
    other = tmp_path / "something-else.metrics"
    for path in (orphan, mine, elsewhere, unnamed, other):
        path.write_bytes(b"0" * 64)
    remove_orphaned_boards(tmp_path)
    assert not orphan.exists()
    assert mine.exists() and elsewhere.exists() and unnamed.exists() and other.exists()


def test_created_board_names_its_creator_and_engine(tmp_path):
    board = StreamingBoard.create(engine_key("1234", 2), tmp_path)
    namespace = os.stat("/proc/self/ns/pid").st_ino
    assert board.path.name == f"vllm-sink-{namespace}-{os.getpid()}-1234-2.metrics"
