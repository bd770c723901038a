"""A chat service: many conversations taking turns, regenerates, edits, a restart half way.

Conversations (more than the KV pool holds) talk to ``vllm serve`` SmolLM2
through ``/v1/chat/completions``, each turn a passage of the Debian handbook
and a question, with think time between turns; about 10% of turns regenerate
the last answer (sampled), 5% edit the last message, and the server is
restarted half way (SIGTERM, then the same command). About 5% of turns are
sent from a second tab as well, at the same moment (a ``second_tab`` turn is
that second request; the conversation goes on with the first one's answer).
The same seeded trace runs against each system:

* ``tiers``: vllm-sink with its snapshot tiers (host memory and a directory);
* ``today``: vllm-sink as released before them (``--plugin-path``: a checkout of
  that commit, its ``patches/`` inside its ``vllm_sink/``), the same streaming flags;
* ``vllm``: plain vLLM with its prefix cache, on the same KV cache budget, the
  histories within the model's context.

Per turn: time to first token (streamed), prompt tokens, and the prompt tokens
served from cache (``usage.prompt_tokens_details.cached_tokens``, with
``--enable-prompt-tokens-details``: a snapshot hit, or vLLM's prefix cache), from
which a turn counts as resumed (the cache held its history before its last message,
give or take a block). ``/metrics`` is sampled for KV cache and
snapshot memory. guidellm cannot regenerate, edit or restart, hence this
harness; ``benchmarks/guidellm_chat.py`` runs guidellm's own multi-turn chat.
Writes ``results/<name>.json`` and ``results/<name>.png``.

    .venv/bin/python benchmarks/chat_service.py --systems tiers vllm --name chat_service
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import MODEL, RESULTS, save_result

from vllm_sink_dev.serve import metric_samples, vllm_serve

STREAMING = ["--streaming-sinks", "4", "--streaming-window", "1020"]
COMMON = ["--max-num-batched-tokens", "512", "--enable-prompt-tokens-details",
          "--max-num-seqs", "8"]  # fmt: skip
BRANCHES = ("regenerate", "edit", "second_tab")
"""Turn kinds that branch off a conversation instead of continuing it."""
QUESTIONS = [
    "In two sentences, what is this passage about?",
    "Which command or file does this passage mention first?",
    "Who would need this passage, and why?",
    "Summarize this passage in one sentence.",
    "What is the most important advice in this passage?",
    "List two facts from this passage.",
]


@dataclass
class Turn:
    conversation: int
    index: int
    kind: str
    """``next``, ``regenerate``, ``edit`` or ``second_tab``."""
    after_restart: bool
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    error: str = ""

    def resumed(self, new_tokens: int) -> bool:
        """Whether the cache held the history before the turn's last message.

        ``new_tokens``: the most a turn's last message takes, plus a block (vLLM's
        prefix cache reuses whole blocks); more than a chat template's opening.
        """
        return self.cached_tokens > 64 and self.cached_tokens >= self.prompt_tokens - new_tokens


@dataclass
class Conversation:
    index: int
    passages: list[str]
    rng: random.Random
    messages: list[dict] = field(default_factory=list)
    turns_done: int = 0


def plan(turns: int, seed: int, index: int) -> list[str]:
    """A conversation's turn kinds: the first a new message, then ~10% regenerate, ~5% edit,
    ~5% sent from two tabs."""
    rng = random.Random(seed * 1000 + index)
    kinds = ["next"]
    for _ in range(turns - 1):
        draw = rng.random()
        kinds.append(
            "regenerate" if draw < 0.10
            else "edit" if draw < 0.15
            else "second_tab" if draw < 0.20
            else "next"
        )  # fmt: skip
    return kinds


async def ask(client, model: str, messages: list[dict], temperature: float,
              max_tokens: int) -> tuple[str, dict]:  # fmt: skip
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    end = time.perf_counter()
    details = getattr(usage, "prompt_tokens_details", None)
    return "".join(pieces), {
        "ttft_s": (first or end) - start,
        "total_s": end - start,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": (getattr(details, "cached_tokens", None) or 0) if details else 0,
    }


async def take_turn(client, model, conversation: Conversation, kind: str, after_restart: bool,
                    max_tokens: int) -> list[Turn]:  # fmt: skip
    """One turn (two requests from a second tab); the conversation's history changes as the
    user's client would change it."""
    rng, messages = conversation.rng, conversation.messages
    turn = Turn(conversation.index, conversation.turns_done, kind, after_restart)
    tabs = [turn]
    if kind == "second_tab" and messages:
        turn.kind = "next"
        tabs.append(Turn(conversation.index, conversation.turns_done, kind, after_restart))
    if kind in ("next", "second_tab") or not messages:
        turn.kind = "next"
        passage = conversation.passages[conversation.turns_done]
        request = [*messages, {"role": "user", "content": f"{passage}\n\n{rng.choice(QUESTIONS)}"}]
        temperature = 0.0
    else:  # the last answer again (regenerate), or to an edited last message
        request = messages[:-1]
        if kind == "edit":
            passage = request[-1]["content"].rpartition("\n\n")[0]
            request = [
                *request[:-1],
                {"role": "user", "content": f"{passage}\n\n{rng.choice(QUESTIONS)}"},
            ]
        temperature = 0.8 if kind == "regenerate" else 0.0
    # Unseeded: vLLM 0.32 on CPU fails seeded requests whose prompt spans prefill
    # chunks ("CPU Generator does not use offset"; vllm-sink's worker does not).
    answers = await asyncio.gather(
        *(ask(client, model, request, temperature, max_tokens) for _ in tabs),
        return_exceptions=True,
    )
    for tab, answer in zip(tabs, answers):
        if isinstance(answer, BaseException):
            tab.error = f"{type(answer).__name__}: {answer}"
        else:
            for name, value in answer[1].items():
                setattr(tab, name, value)
    if not turn.error:
        conversation.messages = [*request, {"role": "assistant", "content": answers[0][0]}]
        conversation.turns_done += 1
    return tabs


class Service:
    """The server under test, restartable, with ``/metrics`` sampled in the background."""

    def __init__(self, flags: list[str], log_dir: Path, kv_gib: float, env: dict) -> None:
        self.flags, self.log_dir, self.kv_gib, self.env = flags, log_dir, kv_gib, env
        self.stack = contextlib.ExitStack()
        self.server = None
        self.memory: list[dict] = []
        self.lives = 0

    def start(self) -> None:
        self.lives += 1
        log = self.log_dir / f"server-{self.lives}.log"
        self.server = self.stack.enter_context(
            vllm_serve(MODEL, self.flags, log, self.kv_gib, self.env)
        )

    def stop(self) -> None:
        self.stack.close()
        self.stack = contextlib.ExitStack()

    def sample(self, started: float) -> None:
        with contextlib.suppress(Exception):
            samples = metric_samples(self.server.url)
            tiers = {}
            for key, value in samples.items():
                if key.startswith("vllm_sink:snapshot_tier_bytes{"):
                    tiers[key.partition('tier="')[2].partition('"')[0]] = value
            usage = next(
                (v for k, v in samples.items() if k.startswith("vllm:kv_cache_usage_perc")), 0
            )
            self.memory.append(
                {
                    "t_s": time.perf_counter() - started,
                    "life": self.lives,
                    "kv_used_gib": usage * self.kv_gib,
                    **{f"snapshot_{t}_gib": b / 2**30 for t, b in tiers.items()},
                }
            )


async def run_system(name: str, flags: list[str], env: dict, args, passages, log_dir) -> dict:
    import openai

    service = Service([*flags, *COMMON], log_dir, args.kv_gib, env)
    conversations = [
        Conversation(i, passages[i * args.turns : (i + 1) * args.turns], random.Random(i))
        for i in range(args.conversations)
    ]
    plans = [plan(args.turns, args.seed, i) for i in range(args.conversations)]
    total = args.conversations * args.turns
    turns: list[Turn] = []
    started = time.perf_counter()
    semaphore = asyncio.Semaphore(args.concurrency)
    restarted = asyncio.Event()
    state = {"begun": 0, "pending": 0}
    """Turns begun, and begun but not done: the restart waits for none pending."""
    if not args.restart:
        restarted.set()

    async def user(conversation: Conversation, kinds: list[str]) -> None:
        rng = random.Random(args.seed + conversation.index)
        await asyncio.sleep(rng.uniform(0, args.stagger_s))
        for kind in kinds:
            while state["begun"] >= total // 2 and not restarted.is_set():
                await restarted.wait()
            state["begun"] += 1
            state["pending"] += 1
            async with semaphore:
                client = openai.AsyncOpenAI(base_url=f"{service.server.url}/v1", api_key="-",
                                            max_retries=0, timeout=900)  # fmt: skip
                after_restart = args.restart and restarted.is_set()
                tabs = await take_turn(client, service.server.model, conversation, kind,
                                       after_restart, args.max_tokens)  # fmt: skip
            state["pending"] -= 1
            turns.extend(tabs)
            for turn in tabs:
                print(f"[{name}] {state['begun']}/{total} conv {turn.conversation} "
                      f"{turn.kind:10s} prompt {turn.prompt_tokens:5d} cached "
                      f"{turn.cached_tokens:5d} ttft {turn.ttft_s:6.2f}s {turn.error}",
                      flush=True)  # fmt: skip
            await asyncio.sleep(rng.expovariate(1 / args.think_s))

    async def restart_half_way() -> None:
        while not restarted.is_set():
            await asyncio.sleep(0.5)
            if state["begun"] >= total // 2 and state["pending"] == 0:
                print(f"[{name}] restarting the server", flush=True)
                await asyncio.to_thread(service.stop)
                await asyncio.to_thread(service.start)
                restarted.set()

    async def sample_memory() -> None:
        while True:
            await asyncio.to_thread(service.sample, started)
            await asyncio.sleep(2)

    service.start()
    try:
        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(
            restart_half_way(), *(user(c, p) for c, p in zip(conversations, plans))
        )
        sampler.cancel()
    finally:
        service.stop()
    new_tokens = args.passage_tokens + 40 + 128
    return {"turns": [asdict(t) | {"resumed": t.resumed(new_tokens)} for t in turns],
            "memory": service.memory, "wall_s": time.perf_counter() - started}  # fmt: skip


def summarize(turns: list[dict]) -> dict:
    """The issue's figures: turns resumed, per kind, after the restart, TTFT by history."""
    ok = [t for t in turns if not t["error"]]
    by_conv: dict[int, list[dict]] = {}
    for t in sorted(ok, key=lambda t: (t["conversation"], t["index"])):
        by_conv.setdefault(t["conversation"], []).append(t)
    after_first_resume = []
    for conv in by_conv.values():
        first = next((i for i, t in enumerate(conv) if t["resumed"]), None)
        if first is not None:
            after_first_resume += conv[first + 1 :]
    first_after_restart = [
        next(t for t in conv if t["after_restart"]) for conv in by_conv.values()
        if any(t["after_restart"] for t in conv) and conv[0]["index"] == 0
        and not all(t["after_restart"] for t in conv)
    ]  # fmt: skip
    resumed_next = [t["ttft_s"] for t in ok if t["kind"] == "next" and t["resumed"] and t["index"]]
    base = statistics.median(resumed_next) if resumed_next else float("nan")

    def median_ttft(kind: str) -> float:
        values = [t["ttft_s"] for t in ok if t["kind"] == kind and t["index"]]
        return statistics.median(values) if values else float("nan")

    def quantile(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    buckets = {}
    for low in range(0, 4000, 500):
        values = [t["ttft_s"] for t in ok if low <= t["prompt_tokens"] < low + 500 and t["index"]]
        if values:
            buckets[f"{low}-{low + 499}"] = {"n": len(values), "p50": quantile(values, 0.5),
                                             "p99": quantile(values, 0.99)}  # fmt: skip
    later = [t for t in ok if t["index"]]
    return {
        "turns": len(turns),
        "errors": len(turns) - len(ok),
        "later_turns_resumed": sum(t["resumed"] for t in later) / max(1, len(later)),
        "resumed_after_first_resume": sum(t["resumed"] for t in after_first_resume)
        / max(1, len(after_first_resume)),
        "conversations_resumed_after_restart": sum(t["resumed"] for t in first_after_restart)
        / max(1, len(first_after_restart)),
        "ttft_median_s": {k: median_ttft(k) for k in ("next", *BRANCHES)},
        "ttft_vs_resumed_next": {k: median_ttft(k) / base for k in BRANCHES},
        "ttft_by_prompt_tokens": buckets,
        "ttft_p50_s": quantile([t["ttft_s"] for t in later], 0.5),
        "ttft_p99_s": quantile([t["ttft_s"] for t in later], 0.99),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"tiers": "tab:green", "today": "tab:red", "vllm": "tab:blue"}
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    for i, (name, result) in enumerate(results.items()):
        turns = [t for t in result["turns"] if not t["error"] and t["index"]]
        for resumed, marker in ((True, "o"), (False, "x")):
            chosen = [t for t in turns if t["resumed"] == resumed]
            label = f"{name} ({'resumed' if resumed else 'not resumed'})"
            xs, ys = [t["prompt_tokens"] for t in chosen], [t["ttft_s"] for t in chosen]
            axes[0].scatter(xs, ys, s=14, marker=marker, color=colors.get(name), label=label)
        summary = result["summary"]
        xs = list(summary["ttft_by_prompt_tokens"])
        axes[1].plot(xs, [summary["ttft_by_prompt_tokens"][x]["p50"] for x in xs], "-o",
                     color=colors.get(name), label=f"{name} p50")  # fmt: skip
        axes[1].plot(xs, [summary["ttft_by_prompt_tokens"][x]["p99"] for x in xs], "--",
                     color=colors.get(name), label=f"{name} p99")  # fmt: skip
        memory = result["memory"]
        in_memory = [m["kv_used_gib"] + m.get("snapshot_host_gib", 0) for m in memory]
        label = f"{name}: KV in use + snapshots in host memory"
        axes[2].plot([m["t_s"] for m in memory], in_memory, color=colors.get(name), label=label)
        ratios = summary["ttft_vs_resumed_next"]
        xs = [j + 0.25 * (i - 1) for j in range(len(BRANCHES))]
        axes[3].bar(xs, [ratios[k] for k in BRANCHES], width=0.25, color=colors.get(name),
                    label=name)  # fmt: skip
    axes[0].set(xlabel="prompt tokens (history)", ylabel="time to first token (s)", yscale="log",
                title="every turn after a conversation's first")  # fmt: skip
    axes[1].set(xlabel="prompt tokens", ylabel="time to first token (s)", yscale="log",
                title="p50 and p99 by history length")  # fmt: skip
    axes[1].tick_params(axis="x", rotation=30)
    axes[2].set(xlabel="seconds (restart half way)", ylabel="GiB", title="memory")
    axes[3].axhline(3, color="grey", linestyle=":", label="target: within 3x")
    axes[3].set_xticks(range(len(BRANCHES)), BRANCHES)
    axes[3].set(ylabel="median first token / a resumed next turn's",
                title="branches of a conversation")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--systems", nargs="+", default=["tiers", "today", "vllm"])
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--passage-tokens", type=int, default=180)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--think-s", type=float, default=2.0)
    parser.add_argument("--stagger-s", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--host-gib", type=float, default=1.0)
    parser.add_argument("--no-restart", dest="restart", action="store_false")
    parser.add_argument(
        "--plugin-path", default=None, help="the vllm-sink release to run as 'today' (PYTHONPATH)"
    )
    parser.add_argument("--log-dir", default=None, help="keep the servers' logs here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="chat_service")
    args = parser.parse_args()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"  # what vllm_serve's servers compute on

    from common import handbook_tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text = handbook_tokens()
    count = args.conversations * args.turns
    step = args.passage_tokens
    passages = [tokenizer.decode(text[i * step : (i + 1) * step]) for i in range(count)]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        systems = {
            "tiers": ([*STREAMING, "--streaming-snapshot-host-size", str(args.host_gib),
                       "--streaming-snapshot-dir", str(scratch / "snapshots")], {}),
            "today": (STREAMING, {"PYTHONPATH": args.plugin_path or ""}),
            "vllm": (["--max-model-len", "8192", "--enable-prefix-caching"], {}),
        }  # fmt: skip
        for name in args.systems:
            flags, env = systems[name]
            if name == "today" and not args.plugin_path:
                raise SystemExit("--plugin-path: a checkout of the release to compare with")
            log_dir = Path(args.log_dir or scratch) / name
            log_dir.mkdir(parents=True, exist_ok=True)
            result = asyncio.run(run_system(name, flags, env, args, passages, log_dir))
            result["summary"] = summarize(result["turns"])
            result["flags"] = [*flags, *COMMON]
            results[name] = result
            print(name, result["summary"], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS / f"{args.name}.png")
    settings = {k: v for k, v in vars(args).items() if k not in ("systems", "name")}
    save_result(args.name, {"settings": settings,
                            "summary": {n: r["summary"] for n, r in results.items()},
                            "systems": results}, print_without=("systems",))  # fmt: skip


if __name__ == "__main__":
    main()
