"""Soak `vllm serve` with streaming: a mix of clients for many minutes, then check nothing leaked.

Starts ``vllm serve`` itself (``vllm_sink_dev/serve.py``) on SmolLM2 with its
declared context cut to 1,024 positions, so that every long request outgrows
it: 4 sinks + a 252-token window, KV blocks of 32 tokens, prefill chunks of
256, float32, eager, both cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``). Then
``--workers`` client threads loop for ``--minutes``, each picking requests at
random (seeded): long SSE streams past the context, long prompts, multi-turn
chats, seeded sampling, parallel sampling (``n`` > 1), clients that disconnect
during prefill or during decode, and bad requests. Every request has a
timeout and the run stops by itself.

Every ``--idle-every`` seconds all workers pause, the server drains, and its
streaming figures are sampled: ``vllm_sink:resident_kv_blocks``,
``vllm_sink:streams`` and ``vllm:kv_cache_usage_perc`` must be back to zero
(KV blocks of finished or aborted streams all returned). The RSS of the
server's whole process tree is sampled every 10 s. Writes
``results/<name>.json`` (figures, errors by kind with reasons, provenance) and
``results/<name>.png`` (RSS, KV blocks at idle moments, requests and errors
over time).

    .venv/bin/python benchmarks/soak.py --minutes 30 --workers 4 --seed 0 --name soak_smollm2_30min

The server, the clients and the driving loop are ``vllm_sink_dev/soak_driver.py``
(``tests/test_soak.py`` runs them for two minutes); this script runs them, then writes
the figures and the plot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import MODEL, REPO, RESULTS, provenance

from vllm_sink_dev.soak_driver import (
    CONTEXT,
    FLAGS,
    KV_SPACE_GIB,
    run_soak,
    short_context_server,
    summary,
)


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS over time, KV blocks (busy and at idle moments), requests and errors over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rss_axis, kv_axis, count_axis) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    samples = [s for s in result["rss_samples"] if "rss_mib" in s]
    rss_axis.plot([s["seconds"] / 60 for s in samples], [s["rss_mib"] for s in samples],
                  color="tab:red")  # fmt: skip
    rss_axis.set_ylabel("server RSS, whole tree (MiB)")
    rss = result["rss_mib"]
    rss_axis.set_title(
        f"RSS {rss['start']} -> {rss['end']} MiB (max {rss['max']}); grey: idle moments",
        fontsize=9,
    )
    rss_axis.set_ylim(0, 1.2 * max((s["rss_mib"] for s in samples), default=1))

    busy = [s for s in samples if "resident_kv_blocks" in s]
    kv_axis.plot([s["seconds"] / 60 for s in busy], [s["resident_kv_blocks"] for s in busy],
                 color="tab:blue", alpha=0.4, label="every 10 s (busy)")  # fmt: skip
    idle = [s for s in result["idle_samples"] if s["resident_kv_blocks"] is not None]
    kv_axis.scatter([s["seconds"] / 60 for s in idle], [s["resident_kv_blocks"] for s in idle],
                    color="tab:green", zorder=3, label="at idle moments (must be 0)")  # fmt: skip
    kv_axis.set_ylabel("vllm_sink:resident_kv_blocks")
    kv_axis.set_ylim(bottom=-0.5)
    kv_axis.legend(loc="upper right")

    timeline = result["timeline"]
    end = result["wall_s"] / 60
    for outcome, color in (("any", "black"), ("served", "tab:green"), ("error", "tab:red"),
                           ("timeout", "tab:orange")):  # fmt: skip
        times = [t / 60 for t, _, o in timeline if outcome in ("any", o)]
        count_axis.step([0, *times, end], [0, *range(1, len(times) + 1), len(times)],
                        where="post", color=color, label=f"{outcome} ({len(times)})")  # fmt: skip
    for axis in (rss_axis, kv_axis, count_axis):
        for pause in result["idle_samples"]:
            begin = (pause["seconds"] - pause["settle_s"]) / 60
            axis.axvspan(begin, max(pause["seconds"] / 60, begin + 0.05), color="0.9", zorder=0)
    count_axis.set_ylabel("requests finished, by outcome (cumulative)")
    count_axis.set_xlabel("minutes")
    count_axis.legend(loc="upper left")
    totals = result["totals"]
    figure.suptitle(
        f"Soak of vllm serve ({result['settings']['workers']} clients, "
        f"{result['settings']['minutes']} min): {totals['served']} served, "
        f"{totals['errors']} errors, {totals['tokens_per_s']} tokens/s"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-every", type=float, default=120, help="seconds")
    parser.add_argument("--name", default="soak_smollm2_30min")
    args = parser.parse_args()

    origin = provenance()
    with tempfile.TemporaryDirectory(prefix="soak-") as root:
        began = time.time()
        with short_context_server(MODEL, Path(root)) as server:
            startup_s = time.time() - began
            print(f"vllm serve healthy after {startup_s:.0f} s at {server.url}")
            figures = run_soak(
                server, args.minutes, args.workers, args.seed, idle_every_s=args.idle_every
            )
            log_tail = server.log.read_text().splitlines()[-60:]
    threads = figures["server_env"]["VLLM_CPU_OMP_THREADS_BIND"]
    origin["threads"] = f"VLLM_CPU_OMP_THREADS_BIND={threads} (the server's environment)"
    result = {
        **origin,
        "name": args.name,
        "server": {"model": str(MODEL.relative_to(REPO)), "declared_context": CONTEXT,
                   "flags": FLAGS, "kv_space_gib": KV_SPACE_GIB, "dtype": "float32",
                   "enforce_eager": True, "startup_s": round(startup_s, 1)},
        **figures,
    }  # fmt: skip
    totals = result["totals"]
    if totals["errors"] or totals["timeouts"] or not result["server_alive_at_end"]:
        result["server_log_tail"] = log_tail
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{args.name}.png")
    print(summary(result))
    print(f"wrote {RESULTS / args.name}.json and .png")


if __name__ == "__main__":
    main()
