"""An independent StreamingLLM reference for Llama-shaped checkpoints, in plain torch.

Llama-shaped: pre-norm decoder layers whose attention has ``q_proj``,
``k_proj``, ``v_proj`` and ``o_proj`` (Llama, Mistral, Qwen2 and Qwen3 with
their q/k norms, StableLM with its partial rotary dims, Gemma 3 with its
sliding-window layers and a RoPE base per layer kind), and GPT-J (parallel
attention and MLP, rotary on interleaved pairs of the first dims). A
sliding-window layer attends, of what the stream holds, only the keys within
its window in the text (never the sinks once they are that far).

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


def first_unchanged_step_start(
    steps: list[tuple[int, int]],
    sinks: int,
    window: int,
    block_size: int,
    sliding_window: int | None = None,
) -> int:
    """The earliest step start after which no step changed what the stream's cache holds.

    ``steps`` as for :func:`window_starts_of_steps`, in order. The cache changes
    only where a step begins: whole blocks leave the window (README rule) and,
    in a sliding-window layer group, whole blocks its window has passed are
    freed. Cut anywhere from here on, the cache is that of the stream cut there.
    """

    def state(n: int) -> tuple[int, int]:
        passed = 0 if sliding_window is None else max(1, (n - sliding_window + 1) // block_size)
        return evicted_tokens(n, sinks, window, block_size), passed

    first = len(steps) - 1
    while first and state(steps[first - 1][0]) == state(steps[-1][0]):
        first -= 1
    return steps[first][0]


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


def _rope_frequencies(
    config, rotary_dim: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and its cos/sin scale (YaRN's mscale; 1 for most).

    Plain RoPE from its formula; scaled variants (linear, dynamic NTK, YaRN,
    Llama 3) as transformers defines them, which vLLM implements separately.
    ``layer_type``: the layer kind of a model with RoPE parameters per kind (Gemma 3).
    """
    rope = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        rope = rope[layer_type]
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
        return inv_freq.to(torch.float64), float(scale)
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)), 1.0


def _rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return (angles.cos() * scale).to(torch.float32), (angles.sin() * scale).to(torch.float32)


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool = True
) -> torch.Tensor:
    """RoPE on ``x[tokens, heads, dim]`` with per-token cos/sin.

    Only the first ``2 * cos.shape[-1]`` dims rotate (partial rotary); neox
    style pairs dim ``i`` with ``i + half``, GPT-J style ``2i`` with ``2i + 1``.
    """
    rotary_dim = 2 * cos.shape[-1]
    rot = x[..., :rotary_dim]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


class StreamingLlamaReference:
    """Teacher-forced log-probabilities of a Llama model under StreamingLLM."""

    def __init__(self, model_path: str | Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        rope = getattr(config, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        self.rotary_dim = int(self.head_dim * float(partial or 1.0))
        self.gptj = config.model_type == "gptj"
        if self.gptj:
            self.rotary_dim = config.rotary_dim or self.head_dim
        self.inv_freq, self.rope_scale = _rope_frequencies(config, self.rotary_dim)
        layer_types = getattr(config, "layer_types", None)
        kinds = set(layer_types or ())
        self.layer_ropes = [
            _rope_frequencies(config, self.rotary_dim, t if len(kinds) > 1 else None)
            for t in (layer_types or [None] * config.num_hidden_layers)
        ]
        """Each layer's RoPE frequencies and scale (they differ only in hybrid models)."""
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

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
        if self.gptj:
            model = self.model.transformer
            hidden = model.wte(torch.tensor(token_ids))
            for layer in model.h:
                h = layer.ln_1(hidden)
                out = self._attention(layer.attn, h, sinks, starts)
                hidden = hidden + layer.attn.out_proj(out) + layer.mlp(h)
            return self.model.lm_head(model.ln_f(hidden)).float()
        model = self.model.model
        hidden = model.embed_tokens(torch.tensor(token_ids))
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            out = self._attention(attn, layer.input_layernorm(hidden), sinks, starts, i)
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3: sandwich norms
                hidden = hidden + layer.post_attention_layernorm(attn.o_proj(out))
                mlp = layer.mlp(layer.pre_feedforward_layernorm(hidden))
                hidden = hidden + layer.post_feedforward_layernorm(mlp)
            else:
                hidden = hidden + attn.o_proj(out)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(model.norm(hidden)).float()
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _attention(
        self, attn, h: torch.Tensor, sinks: int, starts: list[int], layer: int = 0
    ) -> torch.Tensor:
        """The layer's attention output before its output projection, ``[tokens, hidden]``."""
        q = attn.q_proj(h).view(len(h), self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(len(h), self.num_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(len(h), self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3: per-head RMSNorm before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        scale = getattr(attn, "scaling", None) or self.head_dim**-0.5
        window = getattr(attn, "sliding_window", None)
        out = self._streaming_attention(
            q, k, v, sinks, starts, self.layer_ropes[layer], scale, window
        )
        return out.reshape(len(h), -1)

    def _streaming_attention(
        self,
        q,
        k,
        v,
        sinks: int,
        starts: list[int],
        rope: tuple[torch.Tensor, float] | None = None,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        inv_freq, rope_scale = rope or (self.inv_freq, self.rope_scale)
        scale = scale or 1 / math.sqrt(self.head_dim)
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
            cos, sin = _rope_cos_sin(positions, inv_freq, rope_scale)
            k_rot = _rotate(k[keys], cos, sin, not self.gptj).repeat_interleave(group, dim=1)
            v_sel = v[keys].repeat_interleave(group, dim=1)
            query_slots = [keys.index(i) for i in range(p, end + 1)]
            q_rot = _rotate(q[p : end + 1], cos[query_slots], sin[query_slots], not self.gptj)
            scores = torch.einsum("qhd,khd->hqk", q_rot, k_rot) * scale
            key_ids, query_ids = torch.tensor(keys), torch.arange(p, end + 1)
            mask = key_ids[None, :] > query_ids[:, None]
            if sliding_window is not None:  # in the text, not in the cache
                mask |= query_ids[:, None] - key_ids[None, :] >= sliding_window
            scores = scores.masked_fill(mask[None], float("-inf"))
            out[p : end + 1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_sel)
            p = end + 1
        return out


@torch.no_grad()
def recompute_nll(
    model_path: str | Path,
    tokens: list[int],
    cache: int,
    targets: list[int],
    batch: int = 4,
    prefix: list[int] | None = None,
) -> list[float]:
    """Sliding window with re-computation, the paper's oracle: each target token is
    predicted from the ``cache`` tokens before it, encoded afresh at positions
    ``0 .. cache-1`` by the plain transformers model (float32).

    ``prefix``: tokens every window starts with instead of its oldest ones (the
    ``<bos>`` of a model whose prompts always begin with it, as served prompts do).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prefix = prefix or []
    nll = []
    for i in range(0, len(targets), batch):
        chunk = targets[i : i + batch]
        ids = torch.tensor([prefix + tokens[t - cache + len(prefix) : t] for t in chunk])
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        nll += [-logprobs[j, tokens[t]].item() for j, t in enumerate(chunk)]
    return nll
