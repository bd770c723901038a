"""The reference way of running StreamingLLM against vllm-sink serving concurrent streams.

The peer is the paper's own recipe on a plain transformers model, one sequence
at a time: ``streaming_llm/kv_cache.py``'s ``StartRecentKVCache`` applied after
every token, as its ``eval_long_ppl.py`` loop does (keep the first S tokens and
the last W, drop the rest), each new token placed right after the cache. The
original keeps keys before RoPE and rotates the whole cache at every step;
transformers caches keys after RoPE, so here the kept window keys are rotated
back by the number of dropped tokens at every eviction instead (what
transformers' own ``SinkCache`` did): the same positions, the same attention,
the same O(W) work per token.

vllm-sink serves the same prompts as ``--streams`` concurrent requests in one
engine. Both greedy, ``ignore_eos``, same prompts, model, dtype, sinks and
window, same CPU threads. Reports generated tokens per second (prefill
included) and the ratio. Writes ``results/<name>.json``.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/peer_hf.py
"""

from __future__ import annotations

import argparse
import time

import torch
from common import MODEL, handbook_tokens, save_result, shutdown, thread_setting


class SinkWindowCache:
    """StreamingLLM's start + recent eviction on a transformers ``DynamicCache``."""

    def __init__(self, model, sinks: int, window: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=model.config)
        self.sinks, self.window = sinks, window
        self.inv_freq = model.model.rotary_emb.inv_freq.to(torch.float32)
        self.scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
        if self.scaling != 1.0:
            raise ValueError("the peer re-rotates plain RoPE only")

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    def evict(self) -> None:
        """Drop the oldest window tokens beyond S + W; move the rest to their new positions."""
        excess = len(self) - self.sinks - self.window
        if excess <= 0:
            return
        angle = excess * self.inv_freq
        cos = torch.cat((angle.cos(), angle.cos()))
        sin = torch.cat((angle.sin(), angle.sin()))
        s = self.sinks
        for layer in self.cache.layers:
            kept = layer.keys[..., s + excess :, :]
            half = kept.shape[-1] // 2
            rotated_half = torch.cat((-kept[..., half:], kept[..., :half]), dim=-1)
            back = (kept * cos - rotated_half * sin).to(kept.dtype)  # R(-excess)
            layer.keys = torch.cat((layer.keys[..., :s, :], back), dim=-2)
            layer.values = torch.cat(
                (layer.values[..., :s, :], layer.values[..., s + excess :, :]), dim=-2
            )


@torch.inference_mode()
def peer_generate(model, prompt: list[int], tokens: int, sinks: int, window: int) -> list[int]:
    """One stream, greedy, the StreamingLLM way."""
    cache = SinkWindowCache(model, sinks, window)
    ids = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(tokens):
        positions = torch.arange(len(cache), len(cache) + ids.shape[1]).unsqueeze(0)
        logits = model(
            input_ids=ids, position_ids=positions, past_key_values=cache.cache, use_cache=True
        ).logits
        cache.evict()
        ids = logits[:, -1:].argmax(-1)
        out.append(int(ids))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--name", default="peer_hf_smollm2")
    args = parser.parse_args()
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    threads = torch.get_num_threads()
    text = handbook_tokens()
    prompts = [text[k * 10007 :][: args.prompt] for k in range(args.streams)]

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    start = time.perf_counter()
    peer_outputs = [
        peer_generate(model, p, args.tokens, args.sinks, args.window)
        for p in tqdm(prompts, desc="peer, one stream at a time")
    ]
    peer_seconds = time.perf_counter() - start
    del model

    llm = LLM(
        str(MODEL), dtype="float32", enforce_eager=args.eager, max_num_seqs=args.streams,
        max_num_batched_tokens=1024, disable_log_stats=True,
        additional_config={"streaming_sinks": args.sinks, "streaming_window": args.window},
    )  # fmt: skip
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(requests, params)
    vllm_seconds = time.perf_counter() - start
    shutdown(llm)

    generated = args.streams * args.tokens
    same_prefix = [
        next((i for i, (a, b) in enumerate(zip(o.outputs[0].token_ids, p)) if a != b), len(p))
        for o, p in zip(outputs, peer_outputs)
    ]
    result = {
        "model": MODEL.name,
        "dtype": "float32",
        "streams": args.streams,
        "prompt_tokens": args.prompt,
        "generated_tokens_per_stream": args.tokens,
        "sinks": args.sinks,
        "window": args.window,
        "peer_torch_threads": threads,
        "vllm_compiled": not args.eager,
        "vllm_threads": thread_setting(),
        "peer_seconds": round(peer_seconds, 1),
        "vllm_seconds": round(vllm_seconds, 1),
        "peer_tokens_per_s": generated / peer_seconds,
        "vllm_tokens_per_s": generated / vllm_seconds,
        "ratio": peer_seconds / vllm_seconds,
        "greedy_tokens_equal_to_peer_before_first_difference": same_prefix,
    }
    save_result(args.name, result)


if __name__ == "__main__":
    main()
