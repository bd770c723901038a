"""An independent StreamingLLM reference for Llama checkpoints, in plain torch.

Written from the paper, not from vllm-sink: keys and values are kept before
RoPE, and for every query the attended set (sinks + a window) is given cache
positions ``0 .. len-1`` in cache order and rotated afresh, as in the original
``streaming_llm`` code with position shifting. It reads the weights with
transformers but runs its own attention, in float32.

Which window each query sees is described by ``window_starts``: for the query
at position ``p``, the first non-sink token it attends. Helpers below derive it
for token-by-token decoding and for chunked prompts from the rule documented
in the README (evict whole blocks, keep at least W recent tokens).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def evicted_tokens(num_computed: int, sinks: int, window: int, block_size: int) -> int:
    """README rule: whole blocks leave once the window would still hold >= W tokens."""
    return max(0, (num_computed + 1 - sinks - window) // block_size) * block_size


def window_starts(
    num_tokens: int,
    sinks: int,
    window: int,
    block_size: int,
    prompt_len: int = 0,
    chunk: int = 1,
) -> list[int]:
    """First attended non-sink token for each query position.

    Prompt positions ``< prompt_len`` are processed in chunks of ``chunk`` tokens
    from position 0 (vLLM's chunked prefill of one request); later positions one
    token per step (decoding). A query in a step that starts with ``n`` computed
    tokens sees the window that starts after ``evicted_tokens(n)`` tokens.
    """
    starts = []
    for p in range(num_tokens):
        step_start = (p // chunk) * chunk if p < prompt_len else p
        step_start = min(step_start, p)
        starts.append(sinks + evicted_tokens(step_start, sinks, window, block_size))
    return starts


def window_starts_of_steps(
    steps: list[tuple[int, int]], sinks: int, window: int, block_size: int
) -> list[int]:
    """First attended non-sink token for each query, from the steps that computed them.

    ``steps`` are ``(n, k)``: a step that started with ``n`` tokens computed and
    computed ``k`` more (queries ``n .. n+k-1``), in the order they ran, from
    ``n = 0``. For schedules no formula gives, e.g. a stream recomputed after a
    preemption, with chunk sizes that depend on what else was running.
    """
    starts = [0] * max(n + k for n, k in steps)
    for n, k in steps:
        starts[n : n + k] = [sinks + evicted_tokens(n, sinks, window, block_size)] * k
    return starts


def _rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style RoPE on ``x[tokens, heads, dim]`` with per-token cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class StreamingLlamaReference:
    """Teacher-forced log-probabilities of a Llama model under StreamingLLM."""

    def __init__(self, model_path: str | Path) -> None:
        from transformers import AutoConfig, LlamaForCausalLM

        config = AutoConfig.from_pretrained(model_path)
        self.model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        rope = getattr(config, "rope_parameters", None) or {}
        self.theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    @torch.no_grad()
    def logprobs(self, token_ids: list[int], sinks: int, starts: list[int]) -> torch.Tensor:
        """``out[p]`` = log-softmax of the next-token logits after position ``p``."""
        return torch.log_softmax(self.logits(token_ids, sinks, starts), dim=-1)

    def sampled_logprobs(
        self,
        token_ids: list[int],
        first: int,
        lives: list[list[tuple[int, int]]],
        sinks: int,
        window: int,
        block_size: int,
    ) -> torch.Tensor:
        """Logprob of each token from ``first`` on, as the step that sampled it saw the stream.

        ``lives``: the stream's steps (see :func:`window_starts_of_steps`), one
        list per time its history was computed from token 0 (a preempted
        stream is computed again); each token was sampled by the first step
        to end at its position.
        """
        sampled_in: dict[int, int] = {}
        for life, steps in enumerate(lives):
            for n, k in steps:
                sampled_in.setdefault(n + k, life)
        out = torch.full((len(token_ids) - first,), float("nan"))
        for life, steps in enumerate(lives):
            end = max(n + k for n, k in steps)
            starts = window_starts_of_steps(steps, sinks, window, block_size)
            table = self.logprobs(token_ids[:end], sinks, starts)
            for p in range(first, len(token_ids)):
                if sampled_in.get(p) == life:
                    out[p - first] = table[p - 1, token_ids[p]]
        return out

    @torch.no_grad()
    def logits(self, token_ids: list[int], sinks: int, starts: list[int]) -> torch.Tensor:
        """``out[p]`` = the next-token logits after position ``p`` (float32)."""
        model = self.model.model
        hidden = model.embed_tokens(torch.tensor(token_ids))
        for layer in model.layers:
            attn = layer.self_attn
            h = layer.input_layernorm(hidden)
            q = attn.q_proj(h).view(len(token_ids), self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(len(token_ids), self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(len(token_ids), self.num_kv_heads, self.head_dim)
            out = self._streaming_attention(q, k, v, sinks, starts)
            hidden = hidden + attn.o_proj(out.reshape(len(token_ids), -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(model.norm(hidden)).float()

    def _streaming_attention(self, q, k, v, sinks: int, starts: list[int]) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        p = 0
        while p < len(starts):
            # Queries sharing a window start attend the same cache (plus causality).
            start, end = starts[p], p
            while end + 1 < len(starts) and starts[end + 1] == start:
                end += 1
            keys = list(range(min(sinks, start))) + list(range(start, end + 1))
            positions = torch.arange(len(keys))  # positions within the cache
            cos, sin = _rope_cos_sin(positions, self.head_dim, self.theta)
            k_rot = _rotate(k[keys], cos, sin).repeat_interleave(group, dim=1)
            v_sel = v[keys].repeat_interleave(group, dim=1)
            query_slots = [keys.index(i) for i in range(p, end + 1)]
            q_rot = _rotate(q[p : end + 1], cos[query_slots], sin[query_slots])
            scores = torch.einsum("qhd,khd->hqk", q_rot, k_rot) / math.sqrt(self.head_dim)
            key_ids = torch.tensor(keys)
            mask = key_ids[None, :] > torch.arange(p, end + 1)[:, None]
            scores = scores.masked_fill(mask[None], float("-inf"))
            out[p : end + 1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_sel)
            p = end + 1
        return out


@torch.no_grad()
def recompute_nll(
    model_path: str | Path, tokens: list[int], cache: int, targets: list[int], batch: int = 4
) -> list[float]:
    """Sliding window with re-computation, the paper's oracle: each target token is
    predicted from the ``cache`` tokens before it, encoded afresh at positions
    ``0 .. cache-1`` by the plain transformers model (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    nll = []
    for i in range(0, len(targets), batch):
        chunk = targets[i : i + batch]
        ids = torch.tensor([tokens[t - cache : t] for t in chunk])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
        nll += [-logprobs[j, tokens[t]].item() for j, t in enumerate(chunk)]
    return nll
