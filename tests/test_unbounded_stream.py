"""A stream of millions of tokens with no length setting: bounded KV and worker state.

The engine starts with vLLM's defaults plus the streaming keys: no
``max_model_len``, so no stream length limit. One prompt of 2,097,152 tokens
streams through the tiny Llama; the test samples the scheduler's KV blocks
and the process RSS as it goes.
"""

from __future__ import annotations

import math
import random
import resource

import pytest
from vllm import SamplingParams

from vllm_sink.config import UNLIMITED_STREAM_LEN

pytestmark = pytest.mark.engine

STREAM_TOKENS = 1 << 21
PROMPT_BYTES_PER_TOKEN = 100
"""README figure: host memory vLLM holds per prompt token for the request's life."""


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_two_million_token_stream_keeps_kv_and_host_memory_flat(tiny_llama, engine_factory):
    sinks, window, block, chunk = 4, 252, 32, 1024
    llm = engine_factory(
        tiny_llama,
        dtype="float32",
        block_size=block,
        max_num_batched_tokens=chunk,
        max_num_seqs=4,
        skip_tokenizer_init=True,
        additional_config={"streaming_sinks": sinks, "streaming_window": window},
    )
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    manager = core.scheduler.streaming.sinks
    policy = runner.sink_policy

    # No length limit, and nothing in the worker sized by one.
    assert core.scheduler.max_model_len == UNLIMITED_STREAM_LEN
    assert runner.input_batch.token_ids_cpu.shape[1] == policy.view_width
    # vLLM pads block rows to a multiple of 128 tokens.
    row_blocks = math.ceil(policy.view_width / 128) * 128 // block
    assert runner.input_batch.block_table[0].block_table.np.shape[1] == row_blocks

    rng = random.Random(0)
    prompt = [rng.randrange(3, 500) for _ in range(STREAM_TOKENS)]
    params = SamplingParams(max_tokens=64, ignore_eos=True, detokenize=False)
    engine = llm.llm_engine
    before = rss_bytes()
    engine.add_request("long", {"prompt_token_ids": prompt}, params)

    samples: list[tuple[int, int, int]] = []  # (tokens, resident blocks, rss)
    outputs = []
    step = 0
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.finished)
        step += 1
        if step % 128 == 0 and manager.req_to_blocks:
            (req_id,) = manager.req_to_blocks
            samples.append(
                (manager.stream_lengths()[req_id], manager.resident_blocks(req_id), rss_bytes())
            )
    (out,) = outputs
    assert len(out.outputs[0].token_ids) == 64

    tokens, blocks, rss = zip(*samples)
    assert tokens[-1] > STREAM_TOKENS - 128 * chunk
    # KV: every sample within the per-stream bound, and the pool whole again.
    assert max(blocks) <= policy.max_resident_blocks
    assert manager.peak_resident_blocks <= policy.max_resident_blocks
    assert manager.num_evicted_blocks >= (STREAM_TOKENS - sinks - window - chunk) // block
    # Host memory: the prompt's token lists, held from the start, and then flat.
    assert rss[0] - before <= PROMPT_BYTES_PER_TOKEN * STREAM_TOKENS, rss[0] - before
    assert max(rss) - rss[0] <= 32 * 2**20, (max(rss) - rss[0]) / 2**20
