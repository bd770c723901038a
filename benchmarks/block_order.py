"""CPU_ATTN decode kernel over consecutive vs scattered blocks, same lengths.

A dense request prefilled into a fresh pool holds consecutive blocks; a stream's
window blocks come back from vLLM's free block queue in whatever order other
streams released them. This times vLLM's own CPU decode kernel
(``cpu_attention_with_kv_cache``) on a cache shaped like SmolLM2's (30 layers,
9 query and 3 KV heads of 64 dims, float32, blocks of 128) with both kinds of
block table, the same sequence lengths (staggered across a block as in
``decode.py``), taking turns step by step. No engine: this isolates what the
block order alone costs a decode step's attention.

    .venv/bin/python benchmarks/block_order.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from common import BLOCK_SIZE, HEAD_SIZE, HEADS, KV_HEADS, LAYERS, save_result
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa


def block_tables(batch: int, blocks_per_row: int, pool: int) -> dict[str, torch.Tensor]:
    """Each row's blocks: consecutive (a fresh dense prefill) or drawn in any order."""
    drawn = torch.randperm(pool, generator=torch.Generator().manual_seed(0))
    needed = batch * blocks_per_row
    return {
        "consecutive": torch.arange(needed, dtype=torch.int32).view(batch, blocks_per_row),
        "scattered": drawn[:needed].to(torch.int32).view(batch, blocks_per_row),
    }


def measure(batch: int, cached: int, pool_rows: int, steps: int) -> dict:
    """Median time of one decode step's attention (all layers) with each table."""
    blocks_per_row = math.ceil((cached + BLOCK_SIZE) / BLOCK_SIZE)
    pool = pool_rows * blocks_per_row + 1
    caches = [torch.randn(pool, KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE) for _ in range(LAYERS)]
    key_values = [c.view(pool, KV_HEADS, 2 * BLOCK_SIZE, HEAD_SIZE).chunk(2, dim=2) for c in caches]
    query = torch.randn(batch, HEADS, HEAD_SIZE)
    output = torch.empty_like(query)
    query_start = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.tensor(
        [cached + k * BLOCK_SIZE // batch for k in range(batch)], dtype=torch.int32
    )
    isa = _get_attn_isa(torch.float32, BLOCK_SIZE, HEAD_SIZE, "auto")
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_SIZE,
        seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False,
    )  # fmt: skip

    def attention_step(table: torch.Tensor) -> float:
        start = time.perf_counter()
        for key_cache, value_cache in key_values:
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=key_cache, value_cache=value_cache, output=output,
                query_start_loc=query_start, seq_lens=seq_lens, scale=HEAD_SIZE**-0.5,
                causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
                softcap=0.0, scheduler_metadata=metadata, s_aux=None,
            )  # fmt: skip
        return time.perf_counter() - start

    tables = block_tables(batch, blocks_per_row, pool)
    times: dict[str, list[float]] = {name: [] for name in tables}
    for table in tables.values():
        attention_step(table)  # warm-up
    for step in range(steps):
        order = list(tables) if step % 2 == 0 else list(tables)[::-1]
        for name in order:
            times[name].append(attention_step(tables[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "batch": batch,
        "cached_tokens": cached,
        "pool_blocks": pool,
        "consecutive_ms": 1e3 * median["consecutive"],
        "scattered_ms": 1e3 * median["scattered"],
        "ratio": median["consecutive"] / median["scattered"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--cached", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="block_order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = []
    for cached in args.cached:
        for batch in args.batches:
            cells.append(measure(batch, cached, pool_rows=batch + 2, steps=args.steps))
            print(cells[-1], flush=True)
    save_result(args.name, {"threads": args.threads, "steps": args.steps, "cells": cells})


if __name__ == "__main__":
    main()
