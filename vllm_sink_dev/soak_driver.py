"""Soak a ``vllm serve`` with streaming: a mix of clients, idle moments, the run's figures.

The soak's server (a model cut to a 1,024-position context, so that long requests
outgrow it, with the soak's streaming flags), its clients (long SSE streams, long
prompts, chats, seeded and ``n`` > 1 sampling, disconnects in prefill and in decode,
bad requests), the idle moments at which the workers park, the server drains and its
streaming figures are sampled, and a summary of a run. ``benchmarks/soak.py`` runs it
for half an hour and plots the figures; ``tests/test_soak.py`` runs it for two minutes
and checks that nothing leaked.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vllm_sink_dev.paths import TEXT
from vllm_sink_dev.serve import (
    Server,
    metric_samples,
    server_process,
    tree_rss_mib,
    vllm_serve,
    with_short_context,
)

CONTEXT = 1024
FLAGS = ["--streaming-sinks", "4", "--streaming-window", "252", "--block-size", "32",
         "--max-num-batched-tokens", "256"]  # fmt: skip
CHUNK = 256  # --max-num-batched-tokens: one prefill chunk
KV_SPACE_GIB = 1

KINDS = (
    "long_stream",
    "long_prompt",
    "chat",
    "seeded",
    "parallel_n",
    "disconnect_prefill",
    "disconnect_decode",
    "bad_request",
)
BAD_REQUESTS: tuple[tuple[dict[str, Any], int], ...] = (
    ({"max_tokens": -1}, 400),
    ({"temperature": -1}, 400),
    ({"n": 0}, 400),
    ({"prompt": ""}, 400),
    ({"top_p": 2}, 400),
    ({"model": "no-such-model"}, 404),
)
LONG_TIMEOUT_S = 300  # streams of 1,500 tokens and 3,000-token prompts, with 3 other clients
SHORT_TIMEOUT_S = 120
GAP_TIMEOUT_S = 60  # longest silence allowed between two SSE lines
DRAIN_TIMEOUT_S = LONG_TIMEOUT_S + 30  # an idle moment waits this long for in-flight requests
SETTLE_TIMEOUT_S = 30  # and then this long for the server's figures to reach zero
RSS_EVERY_S = 10
PROGRESS_EVERY_S = 30


class SoakError(Exception):
    """A request came back, but not as it should: the message is the reason recorded."""


class Deadline(TimeoutError):
    """A request outlived its timeout while data still trickled in."""


@contextlib.contextmanager
def short_context_server(model: Path, root: Path) -> Iterator[Server]:
    """``vllm serve`` on ``model`` cut to a 1,024-position context, with the soak's flags."""
    short = with_short_context(model, CONTEXT, root / f"{model.name}-{CONTEXT}")
    with vllm_serve(short, FLAGS, root / "server.log", kv_space_gib=KV_SPACE_GIB) as server:
        yield server


def read_tokens(tokenizer: Any) -> list[int]:
    """The Debian handbook's first 400,000 characters in the model's tokens (as the tests)."""
    return tokenizer(TEXT.read_text()[:400_000])["input_ids"]


def finished_reasons(url: str) -> dict[str, float]:
    """``vllm:request_success_total`` by finish reason: aborts count clients that left."""
    reasons: dict[str, float] = collections.Counter()
    for key, value in metric_samples(url).items():
        if key.startswith("vllm:request_success_total{"):
            reason = key.split('finished_reason="', 1)[1].split('"', 1)[0]
            reasons[reason] += value
    return dict(reasons)


def alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def short_reason(error: BaseException) -> str:
    """One line per failure, so that errors of one cause count together."""
    import openai
    import requests

    if isinstance(error, SoakError):
        return str(error)[:160]
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {error.message[:120]}"
    if isinstance(error, (requests.ConnectionError, openai.APIConnectionError, OSError)):
        return f"connection error ({type(error).__name__})"
    return f"{type(error).__name__}: {str(error)[:120]}"


def is_timeout(error: BaseException) -> bool:
    import openai
    import requests

    return isinstance(error, (requests.Timeout, openai.APITimeoutError, TimeoutError))


@dataclass
class Tally:
    """What happened to the requests of one kind."""

    sent: int = 0
    served: int = 0
    timeouts: int = 0
    disconnects: int = 0
    http_requests: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Gate:
    """Lets the coordinator park every worker between two requests (an idle moment)."""

    def __init__(self, workers: int) -> None:
        self._condition = threading.Condition()
        self._paused = False
        self._parked = 0
        self._active = workers

    def checkpoint(self, keep_going: Callable[[], bool]) -> bool:
        """Called by a worker before each request: waits out a pause; False once done."""
        with self._condition:
            while self._paused and keep_going():
                self._parked += 1
                self._condition.notify_all()
                self._condition.wait(timeout=1)
                self._parked -= 1
            if keep_going():
                return True
            self._active -= 1
            self._condition.notify_all()
            return False

    def pause(self, timeout_s: float) -> bool:
        """Stop workers at their next checkpoint; True once all are parked (or gone)."""
        with self._condition:
            self._paused = True
            return self._condition.wait_for(lambda: self._parked >= self._active, timeout_s)

    def resume(self) -> None:
        with self._condition:
            self._paused = False
            self._condition.notify_all()


class Soak:
    """The clients, their tallies, and the server's figures over one run."""

    def __init__(
        self,
        server: Server,
        minutes: float,
        workers: int,
        seed: int,
        tokens: Sequence[int],
        tokenizer: Any,
        log: Callable[[str], None],
    ) -> None:
        import openai

        self.server = server
        self.process = server_process(server)
        self.workers = workers
        self.seed = seed
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.log = log
        self.client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=SHORT_TIMEOUT_S
        )
        self.start = time.time()
        self.deadline = self.start + 60 * minutes
        self.gate = Gate(workers)
        self.lock = threading.Lock()
        self.tallies = {kind: Tally() for kind in KINDS}
        self.first_round = random.Random(seed).sample(KINDS, len(KINDS))
        self.events: list[tuple[float, str, str]] = []  # (seconds, kind, outcome)
        self.error_log: list[dict[str, Any]] = []
        self.idle_samples: list[dict[str, Any]] = []
        self.rss_samples: list[dict[str, Any]] = []
        self.paused_s = 0.0
        self.server_died_at: float | None = None

    # -- the run ---------------------------------------------------------------

    def elapsed(self) -> float:
        return time.time() - self.start

    def keep_going(self) -> bool:
        if self.server_died_at is None and not alive(self.process):
            self.server_died_at = round(self.elapsed(), 1)
            self.log(f"[{self.elapsed():6.0f} s] the server process is gone")
        return time.time() < self.deadline and self.server_died_at is None

    def next_kind(self, rng: random.Random) -> str:
        """Every kind once in the first round (so short runs cover them all), then at random."""
        with self.lock:
            if self.first_round:
                return self.first_round.pop()
        return rng.choice(KINDS)

    def worker(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-{index}")
        while self.gate.checkpoint(self.keep_going):
            self.run_one(self.next_kind(rng), rng)

    def run_one(self, kind: str, rng: random.Random) -> None:
        tally = self.tallies[kind]
        with self.lock:
            tally.sent += 1
        try:
            getattr(self, kind)(rng, tally)
            outcome = "served"
        except Exception as error:  # every failure is a figure of the run
            outcome = "timeout" if is_timeout(error) else "error"
            reason = short_reason(error)
            with self.lock:
                self.error_log.append(
                    {
                        "seconds": round(self.elapsed(), 1),
                        "kind": kind,
                        "outcome": outcome,
                        "reason": reason,
                    }  # fmt: skip
                )
            if outcome == "error":
                time.sleep(1)  # a dead server must not turn into a busy loop
        with self.lock:
            if outcome == "served":
                tally.served += 1
            elif outcome == "timeout":
                tally.timeouts += 1
            else:
                tally.errors[reason] = tally.errors.get(reason, 0) + 1
            self.events.append((round(self.elapsed(), 2), kind, outcome))

    def sampler(self, stop: threading.Event) -> None:
        """RSS of the server's tree every 10 s, a progress line every 30 s."""
        next_progress = PROGRESS_EVERY_S
        while not stop.is_set():
            sample: dict[str, Any] = {"seconds": round(self.elapsed(), 1)}
            if alive(self.process):
                sample["rss_mib"], sample["processes"] = tree_rss_mib(self.process)
                sample["rss_mib"] = round(sample["rss_mib"], 1)
                with contextlib.suppress(Exception):
                    metrics = self.server.metrics()
                    sample["running"] = metrics["vllm:num_requests_running"]
                    sample["resident_kv_blocks"] = metrics["vllm_sink:resident_kv_blocks"]
            self.rss_samples.append(sample)
            if self.elapsed() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                self.log(self.progress_line(sample))
            stop.wait(RSS_EVERY_S)

    def progress_line(self, sample: dict[str, Any]) -> str:
        totals = self.totals()
        return (
            f"[{self.elapsed():6.0f} s] sent {totals['sent']}, served {totals['served']}, "
            f"errors {totals['errors']}, timeouts {totals['timeouts']}, "
            f"disconnects {totals['disconnects']}; {totals['completion_tokens']} tokens "
            f"({totals['completion_tokens'] / max(self.elapsed(), 1):.1f}/s); "
            f"RSS {sample.get('rss_mib', 'n/a')} MiB; running {sample.get('running', 'n/a')}"
        )

    def idle_moment(self, final: bool) -> None:
        """Park the workers, let the server drain, and sample its streaming figures."""
        began = time.time()
        parked = True if final else self.gate.pause(DRAIN_TIMEOUT_S)
        sample: dict[str, Any] = {"seconds": round(self.elapsed(), 1), "final": final,
                                  "workers_parked": parked}  # fmt: skip
        deadline = time.time() + SETTLE_TIMEOUT_S
        metrics: dict[str, float] = {}
        while alive(self.process):
            with contextlib.suppress(Exception):
                metrics = self.server.metrics()
            settled = metrics and all(
                metrics.get(name) == 0
                for name in (
                    "vllm:num_requests_running",
                    "vllm:num_requests_waiting",
                    "vllm_sink:streams",
                    "vllm_sink:resident_kv_blocks",
                    "vllm:kv_cache_usage_perc",
                )
            )
            if settled or time.time() > deadline:
                break
            time.sleep(0.5)
        sample.update(
            settle_s=round(time.time() - began, 1),
            running=metrics.get("vllm:num_requests_running"),
            waiting=metrics.get("vllm:num_requests_waiting"),
            streams=metrics.get("vllm_sink:streams"),
            resident_kv_blocks=metrics.get("vllm_sink:resident_kv_blocks"),
            resident_kv_tokens=metrics.get("vllm_sink:resident_kv_tokens"),
            kv_cache_usage_perc=metrics.get("vllm:kv_cache_usage_perc"),
            evicted_blocks_total=metrics.get("vllm_sink:evicted_blocks_total"),
        )
        if alive(self.process):
            sample["rss_mib"] = round(tree_rss_mib(self.process)[0], 1)
            with contextlib.suppress(Exception):
                sample["finished_reasons"] = finished_reasons(self.server.url)
        sample["disconnects_so_far"] = self.totals()["disconnects"]
        self.idle_samples.append(sample)
        self.log(
            f"[{self.elapsed():6.0f} s] idle moment after {sample['settle_s']} s: "
            f"resident KV blocks {sample['resident_kv_blocks']}, streams {sample['streams']}, "
            f"KV usage {sample['kv_cache_usage_perc']}, RSS {sample.get('rss_mib')} MiB"
        )
        if not final:
            self.gate.resume()
        self.paused_s += time.time() - began

    def totals(self) -> dict[str, int]:
        with self.lock:
            tallies = list(self.tallies.values())
        return {
            "sent": sum(t.sent for t in tallies),
            "served": sum(t.served for t in tallies),
            "errors": sum(sum(t.errors.values()) for t in tallies),
            "timeouts": sum(t.timeouts for t in tallies),
            "disconnects": sum(t.disconnects for t in tallies),
            "http_requests": sum(t.http_requests for t in tallies),
            "completion_tokens": sum(t.completion_tokens for t in tallies),
        }

    # -- helpers for the requests ----------------------------------------------

    def text(self, rng: random.Random, length: int) -> str:
        """``length`` tokens of the handbook from a random place."""
        start = rng.randrange(len(self.tokens) - length)
        return self.tokenizer.decode(self.tokens[start : start + length])

    def body(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.server.model, **fields}

    def post(self, tally: Tally, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """A plain completion: the reply's JSON, or SoakError for any status but 200."""
        import requests

        with self.lock:
            tally.http_requests += 1
        reply = requests.post(f"{self.server.url}/v1/completions", json=body, timeout=timeout_s)
        if reply.status_code != 200:
            raise SoakError(f"HTTP {reply.status_code}: {reply.text[:120]}")
        return reply.json()

    def stream(
        self, tally: Tally, body: dict[str, Any], timeout_s: float, leave_after: int | None = None
    ) -> tuple[int, dict[str, Any] | None]:
        """An SSE completion: (events with text, usage); leaves after ``leave_after`` events.

        Without ``leave_after`` the stream must end with ``[DONE]``; a stream cut
        short or an error event is a SoakError.
        """
        import requests

        with self.lock:
            tally.http_requests += 1
        deadline = time.time() + timeout_s
        events, usage, done = 0, None, False
        with requests.post(
            f"{self.server.url}/v1/completions", json={**body, "stream": True}, stream=True,
            timeout=(10, GAP_TIMEOUT_S),
        ) as reply:  # fmt: skip
            if reply.status_code != 200:
                raise SoakError(f"HTTP {reply.status_code}: {reply.text[:120]}")
            for line in reply.iter_lines():
                if time.time() > deadline:
                    raise Deadline(f"stream still running after {timeout_s} s")
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise SoakError(f"error event: {str(chunk['error'])[:120]}")
                usage = chunk.get("usage") or usage
                if chunk.get("choices"):
                    events += 1
                    if leave_after is not None and events >= leave_after:
                        return events, usage  # closing the response drops the connection
        if leave_after is not None:
            raise SoakError(f"stream ended after {events} events, before the client left")
        if not done:
            raise SoakError(f"stream cut after {events} events, without [DONE]")
        return events, usage

    def add_tokens(self, tally: Tally, tokens: int) -> None:
        with self.lock:
            tally.completion_tokens += tokens

    # -- the kinds of request (method names are the KINDS) -------------------------

    def long_stream(self, rng: random.Random, tally: Tally) -> None:
        """One SSE stream of 300-1,500 tokens: past the 1,024-token context."""
        max_tokens = rng.randint(300, 1500)
        body = self.body(
            prompt=self.text(rng, rng.randint(20, 200)), max_tokens=max_tokens, temperature=0,
            ignore_eos=True, stream_options={"include_usage": True},
        )  # fmt: skip
        events, usage = self.stream(tally, body, LONG_TIMEOUT_S)
        if usage is None or usage["completion_tokens"] != max_tokens:
            raise SoakError(f"stream gave {usage and usage['completion_tokens']} of {max_tokens}")
        self.add_tokens(tally, usage["completion_tokens"])

    def long_prompt(self, rng: random.Random, tally: Tally) -> None:
        """A prompt of 1,500-3,000 tokens, a short answer."""
        reply = self.post(
            tally,
            self.body(prompt=self.text(rng, rng.randint(1500, 3000)),
                      max_tokens=rng.randint(4, 32), temperature=0),
            LONG_TIMEOUT_S,
        )  # fmt: skip
        if reply["usage"]["prompt_tokens"] <= CONTEXT:
            raise SoakError(f"prompt of {reply['usage']['prompt_tokens']} tokens only")
        self.add_tokens(tally, reply["usage"]["completion_tokens"])

    def chat(self, rng: random.Random, tally: Tally) -> None:
        """A conversation of 2-4 turns through the openai client, its history resent each turn."""
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(rng.randint(2, 4)):
            messages.append(
                {"role": "user",
                 "content": self.text(rng, rng.randint(150, 400)) + "\nSummarize this briefly."}
            )  # fmt: skip
            with self.lock:
                tally.http_requests += 1
            reply = self.client.chat.completions.create(
                model=self.server.model, messages=messages, max_tokens=rng.randint(16, 64),
                temperature=0.7, timeout=LONG_TIMEOUT_S,
            )  # fmt: skip
            answer = reply.choices[0].message.content
            if answer is None:
                raise SoakError("chat reply without content")
            messages.append({"role": "assistant", "content": answer})
            self.add_tokens(tally, reply.usage.completion_tokens)

    def seeded(self, rng: random.Random, tally: Tally) -> None:
        """Seeded sampling over a prompt longer than one prefill chunk."""
        reply = self.post(
            tally,
            self.body(prompt=self.text(rng, rng.randint(CHUNK + 44, 3 * CHUNK)),
                      max_tokens=rng.randint(8, 48), temperature=1.0, seed=rng.randrange(2**31)),
            SHORT_TIMEOUT_S,
        )  # fmt: skip
        self.add_tokens(tally, reply["usage"]["completion_tokens"])

    def parallel_n(self, rng: random.Random, tally: Tally) -> None:
        """``n`` = 2 or 3 samples of one prompt."""
        n = rng.choice((2, 3))
        reply = self.post(
            tally,
            self.body(prompt=self.text(rng, rng.randint(50, 300)), n=n,
                      max_tokens=rng.randint(16, 96), temperature=0.8),
            SHORT_TIMEOUT_S,
        )  # fmt: skip
        if len(reply["choices"]) != n:
            raise SoakError(f"{len(reply['choices'])} choices for n={n}")
        self.add_tokens(tally, reply["usage"]["completion_tokens"])

    def disconnect_prefill(self, rng: random.Random, tally: Tally) -> None:
        """A streamed long prompt whose client hangs up 0.2 s in, long before a token."""
        body = self.body(
            prompt=self.text(rng, rng.randint(1500, 3000)), max_tokens=2000, ignore_eos=True,
            stream=True,
        )  # fmt: skip
        address = urlsplit(self.server.url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        with self.lock:
            tally.http_requests += 1
        try:
            connection.request(
                "POST", "/v1/completions", body=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            time.sleep(0.2)
            if connection.sock is not None:
                connection.sock.shutdown(socket.SHUT_RDWR)
        finally:
            connection.close()
        with self.lock:
            tally.disconnects += 1

    def disconnect_decode(self, rng: random.Random, tally: Tally) -> None:
        """An SSE stream whose client leaves after 5-80 tokens."""
        leave_after = rng.randint(5, 80)
        body = self.body(
            prompt=self.text(rng, rng.randint(50, 600)), max_tokens=2000, temperature=0,
            ignore_eos=True,
        )  # fmt: skip
        self.stream(tally, body, SHORT_TIMEOUT_S, leave_after=leave_after)
        with self.lock:
            tally.disconnects += 1

    def bad_request(self, rng: random.Random, tally: Tally) -> None:
        """An invalid request: it must get its 400 (404 for an unknown model), nothing else."""
        import requests

        change, expected = rng.choice(BAD_REQUESTS)
        body = {**self.body(prompt="Hello", max_tokens=4), **change}
        with self.lock:
            tally.http_requests += 1
        reply = requests.post(f"{self.server.url}/v1/completions", json=body, timeout=30)
        if reply.status_code != expected:
            raise SoakError(f"{change}: HTTP {reply.status_code}, expected {expected}")
        if "message" not in reply.json().get("error", {}):
            raise SoakError(f"{change}: no error message")


def run_soak(
    server: Server,
    minutes: float,
    workers: int = 4,
    seed: int = 0,
    *,
    tokens: Sequence[int] | None = None,
    idle_every_s: float = 120,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Drive ``server`` with ``workers`` random clients for ``minutes``; the run's figures.

    New requests start until ``minutes`` have passed; requests in flight then
    finish (each within its timeout) and a last idle moment is sampled.
    ``tokens``: the text to cut prompts from (default: the Debian handbook).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.model)
    soak = Soak(server, minutes, workers, seed, tokens or read_tokens(tokenizer), tokenizer, log)
    server_env = soak.process.environ()
    rss_start = tree_rss_mib(soak.process)[0]
    log(f"soak: {workers} workers for {minutes} min, idle moments every {idle_every_s:.0f} s")
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=soak.sampler, args=(stop_sampling,), daemon=True)
    sampler.start()
    threads = [
        threading.Thread(target=soak.worker, args=(i,), name=f"soak-{i}", daemon=True)
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    next_idle = soak.start + idle_every_s
    while any(thread.is_alive() for thread in threads) and soak.keep_going():
        if time.time() >= next_idle and time.time() + 30 < soak.deadline:
            soak.idle_moment(final=False)
            next_idle = time.time() + idle_every_s
        time.sleep(0.5)
    driving_s = soak.elapsed()
    log(f"[{driving_s:6.0f} s] no new requests; waiting for those in flight")
    for thread in threads:
        thread.join(timeout=DRAIN_TIMEOUT_S)
    stuck = sum(thread.is_alive() for thread in threads)
    drained_s = soak.elapsed()
    soak.idle_moment(final=True)
    stop_sampling.set()
    sampler.join()

    totals = soak.totals()
    healthy = False
    if alive(soak.process):
        with contextlib.suppress(Exception):
            import requests

            healthy = requests.get(f"{server.url}/health", timeout=10).status_code == 200
    rss = [s["rss_mib"] for s in soak.rss_samples if "rss_mib" in s]
    return {
        "model": server.model,
        "settings": {"minutes": minutes, "workers": workers, "seed": seed,
                     "idle_every_s": idle_every_s, "rss_every_s": RSS_EVERY_S,
                     "long_timeout_s": LONG_TIMEOUT_S, "short_timeout_s": SHORT_TIMEOUT_S},
        "server_env": {key: server_env.get(key) for key in (
            "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_ENABLE_V1_MULTIPROCESSING")},
        "driving_s": round(driving_s, 1),
        "drained_s": round(drained_s, 1),
        "wall_s": round(soak.elapsed(), 1),
        "paused_s": round(soak.paused_s, 1),
        "workers_stuck_at_end": stuck,
        "totals": {
            **totals,
            "tokens_per_s": round(totals["completion_tokens"] / drained_s, 2),
            "tokens_per_s_outside_pauses": round(
                totals["completion_tokens"] / max(drained_s - soak.paused_s, 1), 2),
        },
        "kinds": {kind: asdict(tally) for kind, tally in soak.tallies.items()},
        "errors": soak.error_log,
        "idle_samples": soak.idle_samples,
        "rss_mib": {"start": round(rss_start, 1), "end": rss[-1] if rss else None,
                    "min": min(rss, default=None), "max": max(rss, default=None)},
        "rss_samples": soak.rss_samples,
        "timeline": soak.events,
        "server_died_at": soak.server_died_at,
        "server_alive_at_end": alive(soak.process) and healthy,
    }  # fmt: skip


def summary(result: dict[str, Any]) -> str:
    """A few lines: totals, errors by kind and reason, idle figures, RSS."""
    totals = result["totals"]
    lines = [
        f"{totals['sent']} requests sent, {totals['served']} served, {totals['errors']} errors, "
        f"{totals['timeouts']} timeouts, {totals['disconnects']} disconnects; "
        f"{totals['completion_tokens']} tokens generated, {totals['tokens_per_s']} tokens/s",
    ]
    for kind, tally in result["kinds"].items():
        lines.append(
            f"  {kind:18} sent {tally['sent']:4} served {tally['served']:4} "
            f"timeouts {tally['timeouts']} errors {sum(tally['errors'].values())} "
            + "; ".join(f"{n} x {reason}" for reason, n in tally["errors"].items())
        )
    idle = result["idle_samples"]
    lines.append(
        "idle moments (resident KV blocks / streams / KV usage): "
        + ", ".join(
            f"{s['resident_kv_blocks']}/{s['streams']}/{s['kv_cache_usage_perc']}" for s in idle
        )
    )
    rss = result["rss_mib"]
    lines.append(
        f"RSS {rss['start']} -> {rss['end']} MiB (min {rss['min']}, max {rss['max']}); "
        f"server alive at the end: {result['server_alive_at_end']}"
    )
    return "\n".join(lines)
