"""Numerical drift over a very long stream: re-rotated keys and perplexity at the end.

Streams ``--tokens`` tokens of the Debian handbook (repeated) as one prompt
through SmolLM2 (fp32, in-process engine, 4 + 1020 by default) and then checks:

* **keys**: the layer-0 keys resident in the cache when the stream ends (sinks
  moved at every eviction of the stream, window keys re-rotated whenever the
  stream's RoPE offset wrapped around) against keys computed afresh for the
  same tokens at the same RoPE positions (layer 0's keys depend only on the
  token and its position: embedding, norm, ``k_proj``, RoPE). Reported as the
  largest relative error per key vector, next to the same figure for a short
  stream that never evicts (the noise floor between vLLM's and transformers'
  kernels);
* **perplexity**: the same passage of the text (``--passage`` tokens from
  ``--offset`` into it) in the first and in the last full repetition of the
  text within the stream. The text is cut to a whole number of prefill chunks,
  so both passes see the same tokens at the same cache positions: what differs
  is only what a million tokens of re-rotation did to the cache.

Writes ``results/<name>.json``.

    .venv/bin/python benchmarks/drift.py --tokens 1048576     # 91 minutes here, both cores
"""

from __future__ import annotations

import argparse
import math
import time

from common import MODEL, handbook_tokens, save_result, shutdown, thread_setting


def show_progress(core, total: int):
    """A progress bar of the stream's computed tokens (``generate`` counts only whole prompts)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", unit_scale=True, mininterval=30)
    step = core.step_fn

    def step_and_show():
        result = step()
        computed = sum(r.num_computed_tokens for r in core.scheduler.requests.values())
        bar.update(max(0, computed - bar.n))
        return result

    core.step_fn = step_and_show
    return bar


def stream_and_capture(tokens: list[int], sinks: int, window: int, chunk: int):
    """Per-token NLL, layer-0 resident keys in cache order, their tokens and RoPE offset."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        str(MODEL), dtype="float32", enforce_eager=True, max_num_seqs=1,
        max_model_len=len(tokens) + 8, max_num_batched_tokens=chunk,
        # Snapshots off: the finished stream's blocks are freed, where they are read below.
        additional_config={"streaming_sinks": sinks, "streaming_window": window,
                           "streaming_snapshots": 0},
    )  # fmt: skip
    core = llm.llm_engine.engine_core.engine_core
    manager = core.scheduler.streaming.sinks
    runner = core.model_executor.driver_worker.worker.model_runner
    held: dict[str, list[int]] = {}
    free = manager.free

    def free_and_remember(request_id: str) -> None:
        held[request_id] = [block.block_id for block in manager.req_to_blocks[request_id]]
        free(request_id)

    manager.free = free_and_remember
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    try:
        start = time.time()
        with show_progress(core, len(tokens)):
            out = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]
        seconds = time.time() - start
        nll = [-d[t].logprob for d, t in zip(out.prompt_logprobs[1:], tokens[1:])]

        # The last step started with the last prompt chunk: its eviction count
        # says which blocks form the compact cache [head block, window blocks...].
        policy = runner.sink_policy
        last_step_start = (len(tokens) - 1) // chunk * chunk
        evicted = policy.evicted_blocks(last_step_start)
        (blocks,) = held.values()
        compact = torch.tensor([blocks[0], *blocks[evicted + 1 :]])
        keys = runner._layer_groups[0].layers[0][0].get(compact)  # [blocks, heads, slots, dim]
        keys = keys.permute(0, 2, 1, 3).reshape(-1, keys.shape[1], keys.shape[3]).clone()
    finally:
        shutdown(llm)
    resident = len(tokens) - evicted * policy.block_size
    cached_tokens = tokens[:sinks] + tokens[evicted * policy.block_size + sinks :]
    assert len(cached_tokens) == resident
    offset = policy.rope_offset(evicted * policy.block_size, runner._rebase_period_blocks)
    return nll, keys[:resident], cached_tokens, offset, seconds


def fresh_layer0_keys(token_ids: list[int], offset: int):
    """Layer-0 keys of ``token_ids`` at RoPE positions ``offset, offset + 1, ..``."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_sink_dev.reference import _rope_cos_sin, _rope_frequencies, _rotate

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq, scale = _rope_frequencies(config, head_dim)
    layer = model.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(model.model.embed_tokens(torch.tensor(token_ids)))
        keys = layer.self_attn.k_proj(hidden).view(len(token_ids), -1, head_dim)
        cos, sin = _rope_cos_sin(torch.arange(len(token_ids)) + offset, inv_freq, scale)
        return _rotate(keys, cos, sin)


def relative_error(resident, fresh) -> float:
    return float(((resident - fresh).norm(dim=-1) / fresh.norm(dim=-1)).max())


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--offset", type=int, default=4096, help="passage start in the text")
    parser.add_argument("--passage", type=int, default=8192)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    # A period that is a whole number of prefill chunks (and so of blocks) puts
    # each repetition at the same chunk and eviction phase: the first and last
    # passes then see the same tokens at the same cache positions, and any
    # perplexity difference between them is drift alone.
    text = handbook_tokens()
    period = len(text) // args.chunk * args.chunk
    text = text[:period]
    tokens = (text * (args.tokens // period + 1))[: args.tokens]

    # Noise floor: a stream shorter than sinks + window never re-rotates a key.
    short = tokens[: args.sinks + args.window - 1]
    _, keys, cached, offset, _ = stream_and_capture(short, args.sinks, args.window, args.chunk)
    floor = relative_error(keys, fresh_layer0_keys(cached, offset))
    print(f"no eviction: layer-0 key relative error {floor:.2e}", flush=True)

    nll, keys, cached, offset, seconds = stream_and_capture(
        tokens, args.sinks, args.window, args.chunk
    )
    drift = relative_error(keys, fresh_layer0_keys(cached, offset))
    last_pass = (args.tokens - args.offset - args.passage) // period * period
    first = slice(args.offset - 1, args.offset - 1 + args.passage)  # nll[i] is token i+1
    last = slice(last_pass + first.start, last_pass + first.stop)
    assert tokens[first.start + 1 : first.stop + 1] == tokens[last.start + 1 : last.stop + 1]
    result = {
        "model": MODEL.name,
        "tokens": args.tokens,
        "sinks": args.sinks,
        "window": args.window,
        "prefill_chunk": args.chunk,
        "threads": thread_setting(),
        "seconds": round(seconds),
        "resident_tokens": len(cached),
        "rope_offset_at_end": offset,
        "key_relative_error_after_stream": drift,
        "key_relative_error_without_eviction": floor,
        "passage": {"offset": args.offset, "tokens": args.passage, "text_period": period},
        "perplexity_first_pass": perplexity(nll[first]),
        "perplexity_last_pass": perplexity(nll[last]),
        "last_pass_starts_at": last_pass,
    }
    save_result(args.name or f"drift_smollm2_{args.tokens}", result)


if __name__ == "__main__":
    main()
