"""Worker time per eviction: RoPE offsets against re-rotating the window every time.

One stream's evictions (``vllm_sink.worker.eviction``) on a synthetic paged cache shaped
like SmolLM2's (30 layers, 3 KV heads of 64 dims, float32, blocks of 128, the
CPU_ATTN key layout), decoding past ``--evictions`` evictions:

* **offsets**: the shipped scheme, with SmolLM2's 8,192-position RoPE table:
  each eviction moves the sinks and refills the head block; the window is
  re-rotated once every ``R / bs`` evictions (included in the mean);
* **every eviction**: the same code with a period of one eviction, i.e. the
  window re-rotated at every eviction (vllm-sink before the offsets).

No engine: this isolates the eviction work that a decode step pays on top of
a dense step. Writes ``results/<name>.json``.

    .venv/bin/python benchmarks/eviction_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import BLOCK_SIZE, HEAD_SIZE, KV_HEADS, LAYERS, save_result

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.core.stream_state import StreamState
from vllm_sink.worker.cpu_attn_layout import PagedKV, PageLayout
from vllm_sink.worker.eviction import EvictionPlan, apply_eviction_plan

ROPE_POSITIONS, THETA = 8192, 100000.0  # SmolLM2's RoPE table and base


def smollm2_like_layers(num_blocks: int) -> list[tuple[PagedKV, PagedKV, RopeDeltas]]:
    tokens = torch.arange(BLOCK_SIZE).view(-1, 1) * HEAD_SIZE
    dims = torch.arange(HEAD_SIZE).view(1, -1)
    layout = PageLayout(
        tokens + dims, BLOCK_SIZE * HEAD_SIZE + tokens + dims, 2 * BLOCK_SIZE * HEAD_SIZE
    )
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_SIZE, 2, dtype=torch.float64) / HEAD_SIZE)
    angles = torch.arange(ROPE_POSITIONS, dtype=torch.float64)[:, None] * inv_freq[None]
    rope = RopeDeltas(angles.cos().float(), angles.sin().float(), HEAD_SIZE, True)
    caches = [torch.randn(num_blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE) for _ in range(LAYERS)]
    return [(PagedKV.keys_of(c, layout), PagedKV.values_of(c, layout), rope) for c in caches]


def seconds_per_eviction(policy: SinkWindowPolicy, period: int, evictions: int) -> float:
    """Mean time of ``evictions`` successive one-block evictions of one decoding stream."""
    blocks_held = policy.max_resident_blocks
    layers = smollm2_like_layers(blocks_held + 1)
    row = list(range(blocks_held))
    stream, times = StreamState(prompt_len=0), []
    for k in range(1, evictions + 1):
        n = policy.sinks + policy.window + k * BLOCK_SIZE - 1  # the step of the k-th eviction
        plan = EvictionPlan(period)
        stream.shift = (k - 1) * BLOCK_SIZE
        plan.add(policy, stream, row, n)
        start = time.perf_counter()
        apply_eviction_plan(plan, layers, policy)
        times.append(time.perf_counter() - start)
    return statistics.mean(times[1:])  # the first also copies the sink keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1020, 4092])
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (sets R)")
    parser.add_argument("--evictions", type=int, default=97)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="eviction_cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for window in args.windows:
        policy = SinkWindowPolicy(4, window, BLOCK_SIZE, args.chunk)
        period = policy.rebase_period_blocks(ROPE_POSITIONS)
        offsets = seconds_per_eviction(policy, period, args.evictions)
        every = seconds_per_eviction(policy, 1, args.evictions)
        rows.append(
            {
                "window": window,
                "evictions_between_window_rotations": period,
                "offsets_ms_per_eviction": offsets * 1e3,
                "every_eviction_ms_per_eviction": every * 1e3,
                "speedup": every / offsets,
            }
        )
        print(rows[-1], flush=True)
    result = {"threads": args.threads, "evictions": args.evictions, "rows": rows}
    save_result(args.name, result)


if __name__ == "__main__":
    main()
