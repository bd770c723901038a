"""Start a real ``vllm serve`` subprocess and read its ``/metrics``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

STARTUP_TIMEOUT_S = 600


@dataclass
class Server:
    url: str
    log: Path
    model: str
    process: subprocess.Popen

    def metrics(self) -> dict[str, float]:
        """Samples of vLLM's and vllm-sink's metrics, by name (labels dropped)."""
        return {key.split("{")[0]: value for key, value in metric_samples(self.url).items()}


def metric_samples(url: str) -> dict[str, float]:
    """Every sample of ``url``/metrics, keyed by name and labels as Prometheus prints them."""
    samples = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def tree_rss_mib(process) -> tuple[float, int]:
    """RSS of a ``psutil.Process`` and all its descendants (MiB), and how many processes that is.

    A server is several processes (API server, engine core, worker).
    """
    import psutil

    total, count = 0, 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
            count += 1
    return total / 2**20, count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(
    model: Path,
    flags: list[str],
    log: Path,
    kv_space_gib: int = 2,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``vllm serve model *flags`` on a free loopback port, until the block exits.

    ``env``: more environment variables for the server.
    """
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        **(env or {}),
    }
    command = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(model), *flags,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(2)
        else:
            raise RuntimeError(f"vllm serve did not become healthy in {STARTUP_TIMEOUT_S} s")
        yield Server(url, log, str(model), process)
    finally:
        stop(process, 60)


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, as a user's Ctrl-C or a supervisor would; SIGKILL after ``timeout`` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def with_short_context(model: Path, context: int, path: Path) -> Path:
    """``model`` with its declared context cut to ``context`` positions.

    Same weights (linked, not copied) and the same RoPE: positions below
    ``context`` compute exactly as in the original. Past-the-context tests then
    need a few hundred tokens instead of thousands.
    """
    path.mkdir(parents=True, exist_ok=True)
    for file in model.iterdir():
        if file.name != "config.json":
            (path / file.name).symlink_to(file.resolve())
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = context
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def server_process(server: Server):
    """The ``vllm serve`` process as a ``psutil.Process``: its tree's RSS, signals."""
    import psutil

    return psutil.Process(server.process.pid)
