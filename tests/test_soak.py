"""A short soak of `vllm serve` with streaming, then SIGTERM in the middle of a stream.

The soak (``vllm_sink_dev/soak_driver.py``, as ``benchmarks/soak.py`` runs it, two
minutes here instead of thirty) mixes long SSE streams, long prompts, chats, seeded and
parallel sampling, clients that hang up during prefill or decode, and bad requests on
SmolLM2 cut to a 1,024-token context. Whatever the mix, once the server is idle no
stream may hold a KV block. The last test stops the same server with SIGTERM while it
streams: the server must exit cleanly and leave no process and no
shared-memory file behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from vllm_sink_dev import soak_driver as soak
from vllm_sink_dev.serve import Server, server_process

pytestmark = pytest.mark.engine

SHM = Path("/dev/shm")
TMP = Path("/tmp")
CLIENT_PATIENCE_S = 20  # read timeout of the stream cut by SIGTERM


def listing(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()} if directory.is_dir() else set()


def shm_held_by(processes: list[psutil.Process]) -> set[str]:
    """Names of the ``/dev/shm`` files these processes map or hold open."""
    names = set()
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/maps") as maps:
                paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line}
            fds = Path(f"/proc/{process.pid}/fd")
            paths |= {os.readlink(fd) for fd in fds.iterdir()}
        except (OSError, psutil.Error):
            continue
        names |= {Path(p.removesuffix(" (deleted)")).name for p in paths
                  if p.startswith(f"{SHM}/")}  # fmt: skip
    return names


def board_alive(name: str) -> bool:
    """Whether ``name`` is a vllm-sink metrics board whose creator still runs.

    Boards are named ``vllm-sink-<PID namespace>-<creator pid>-<engine>.metrics``
    and removed when their creator exits; in-process engines of other test runs
    create them too, without mapping them all the time.
    """
    parts = name.split("-")
    if not name.startswith("vllm-sink-") or len(parts) < 5 or not parts[3].isdigit():
        return False
    return psutil.pid_exists(int(parts[3]))


@dataclass
class Served:
    server: Server
    process: psutil.Process
    shm_before: set[str]
    tmp_before: set[str]


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory) -> Iterator[Served]:
    shm_before, tmp_before = listing(SHM), listing(TMP)
    with soak.short_context_server(smollm2, tmp_path_factory.mktemp("soak")) as server:
        yield Served(server, server_process(server), shm_before, tmp_before)


def test_two_minute_soak_leaves_no_kv_blocks_behind(served, handbook_tokens):
    result = soak.run_soak(
        served.server, minutes=2, workers=4, seed=0, tokens=handbook_tokens, idle_every_s=60
    )
    print(soak.summary(result))
    totals = result["totals"]
    assert all(tally["sent"] >= 1 for tally in result["kinds"].values()), result["kinds"]
    assert totals["errors"] == 0, result["errors"]
    assert totals["timeouts"] == 0, result["errors"]
    assert totals["disconnects"] >= 2 and totals["completion_tokens"] > 0
    idle = result["idle_samples"]
    assert len(idle) >= 2 and idle[-1]["final"]
    for sample in idle:
        assert sample["workers_parked"], sample
        assert sample["resident_kv_blocks"] == 0 and sample["streams"] == 0, sample
        assert sample["running"] == 0 and sample["kv_cache_usage_perc"] == 0, sample
    assert result["workers_stuck_at_end"] == 0
    assert result["server_alive_at_end"]


def test_sigterm_during_a_stream_exits_cleanly_and_leaves_nothing(served):
    """Last in the module: it stops the module's server.

    ``vllm serve`` handles SIGTERM by aborting what runs (vLLM's default
    ``shutdown_timeout`` of 0: the engine core is killed at once), then exits
    with 0. Open streams must end at once with an error event and ``[DONE]``:
    without ``patches/shutdown_ends_streams.py`` a race inside vLLM 0.32 left
    them open and silent (2 of 4 tries here) and the server waited for the
    client to hang up.
    """
    process = served.process
    tree = [process, *process.children(recursive=True)]
    assert len(tree) >= 3  # API server, engine core, worker (and multiprocessing's helpers)
    # The server's files: those its processes hold, and any that appeared since it started
    # (files other programs create meanwhile are told apart below: someone alive holds them).
    held = shm_held_by(tree)
    server_shm = (held | listing(SHM)) - served.shm_before
    tree_pids = {str(p.pid) for p in tree}
    boards = {n for n in server_shm if n.startswith("vllm-sink-") and n.split("-")[3] in tree_pids}
    assert boards  # vllm-sink's metrics board, named after its engine core's pid

    body = {"model": served.server.model, "prompt": "Tell me a long story.", "max_tokens": 5000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    reply = requests.post(
        f"{served.server.url}/v1/completions", json=body, stream=True,
        timeout=(10, CLIENT_PATIENCE_S),
    )  # fmt: skip
    lines = reply.iter_lines()
    events = 0
    while events < 20:  # tokens are arriving
        events += next(lines).startswith(b"data: ")
    process.send_signal(signal.SIGTERM)
    sent = time.time()

    tail, ended = [], "closed by the server"
    try:
        for line in lines:
            tail.append(line)
    except requests.exceptions.ChunkedEncodingError:
        ended = "cut by the server"
    except (requests.ConnectionError, requests.Timeout):  # left open: vLLM's race
        ended = f"left open: the client gave up after {CLIENT_PATIENCE_S} s of silence"
    finally:
        reply.close()
    exit_code = process.wait(timeout=max(1.0, sent + 60 - time.time()))
    took_s = time.time() - sent
    assert exit_code == 0, f"vllm serve exited with {exit_code}"
    assert ended == "closed by the server" and b"data: [DONE]" in tail, (ended, tail[-3:])
    assert took_s < 10, f"vllm serve took {took_s:.1f} s to exit"
    _, left = psutil.wait_procs(tree[1:], timeout=10)
    assert not left, f"processes left running: {left}"

    remaining = server_shm & listing(SHM)
    orphans = {
        n for n in remaining - shm_held_by(list(psutil.process_iter())) if not board_alive(n)
    }
    assert not orphans, f"/dev/shm files left behind: {sorted(orphans)}"
    assert not boards & remaining  # removed by the front end although vLLM killed the writer
    print(
        f"SIGTERM: exit {exit_code} after {took_s:.1f} s; the stream was {ended} "
        f"({len(tail)} lines after the signal, {'with' if b'data: [DONE]' in tail else 'no'} "
        f"[DONE]); /dev/shm files held by the server {sorted(held)}, new since it started "
        f"{len(server_shm)}, left and not in use: none; new in /tmp: "
        f"{sorted(listing(TMP) - served.tmp_before)}"
    )
