"""Turning streaming settings into a vLLM engine configuration, or a clear refusal.

:func:`create_streaming_engine_config` runs in place of
``EngineArgs.create_engine_config`` when streaming is asked for, in two steps
around vLLM's own:

* :func:`prepare_engine_args` adjusts the arguments vLLM derives the config
  from (streaming worker and scheduler, no prefix caching, a stream length cap
  past the model's context) and refuses features that cannot stream;
* :func:`check_engine_config` checks the finished config against the model
  (RoPE, full attention only, cache positions within the trained range).

It then tells this process's ``/metrics`` to show the engine's streaming
figures once its engine cores write them (:mod:`vllm_sink.metrics`).

Both raise :class:`~vllm_sink.config.StreamingConfigError` with a message that
says what to change, before any engine process starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm_sink.config import UNLIMITED_STREAM_LEN, StreamingConfigError, streaming_policy
from vllm_sink.frontend.limits import default_max_tokens, trained_positions
from vllm_sink.frontend.model_support import model_refusal, window_refusal
from vllm_sink.frontend.platforms import (
    GPU_WORKER,
    check_attention_backend,
    prepare_cuda_args,
    streaming_worker,
)
from vllm_sink.frontend.vllm_frontend import reread_vllm_envs
from vllm_sink.metrics import serve_streaming_metrics

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

logger = init_logger("vllm.vllm_sink")

SCHEDULER = "vllm_sink.scheduler.scheduler.StreamingScheduler"


def create_streaming_engine_config(
    args: EngineArgs, create: Callable[..., VllmConfig], *create_args, **create_kwargs
) -> VllmConfig:
    """``create(args, ...)`` (vLLM's own) with the streaming settings applied and checked."""
    prepare_engine_args(args)
    chunk_chosen_by_user = args.max_num_batched_tokens is not None
    with long_streams_allowed():
        config = create(args, *create_args, **create_kwargs)
    chunk = fitting_chunk_size(config)
    if chunk is not None and not chunk_chosen_by_user:
        # vLLM's default prefill chunk would carry positions past the model's
        # range: derive the config again with chunks that fit.
        max_num_seqs = min(config.scheduler_config.max_num_seqs, chunk)
        logger.info(
            "vllm-sink: prefill chunks limited to %d tokens (--max-num-batched-tokens) to "
            "keep RoPE positions within the model's range; --max-num-seqs %d",
            chunk,
            max_num_seqs,
        )
        args.max_num_batched_tokens = chunk
        args.max_num_seqs = max_num_seqs
        with long_streams_allowed():
            config = create(args, *create_args, **create_kwargs)
    check_engine_config(config)
    serve_streaming_metrics(config.instance_id, str(config.model_config.served_model_name))
    return config


def prepare_engine_args(args: EngineArgs) -> None:
    import vllm
    from vllm.platforms import current_platform

    from vllm_sink import SUPPORTED_VLLM, __version__

    if tuple(vllm.__version_tuple__[:2]) != SUPPORTED_VLLM:
        raise StreamingConfigError(
            f"vllm-sink {__version__} supports vLLM {SUPPORTED_VLLM[0]}.{SUPPORTED_VLLM[1]}"
            f".x; this is vLLM {vllm.__version__}"
        )
    worker = streaming_worker(current_platform.device_type, os.environ)
    if worker == GPU_WORKER:
        prepare_cuda_args(args, os.environ)
        reread_vllm_envs()  # it sets VLLM_USE_V2_MODEL_RUNNER
    if args.worker_cls not in ("auto", worker):
        raise StreamingConfigError(
            f"streaming needs its own worker class; remove --worker-cls {args.worker_cls}"
        )
    if args.scheduler_cls not in (None, SCHEDULER):
        raise StreamingConfigError(
            f"streaming needs its own scheduler class; remove --scheduler-cls {args.scheduler_cls}"
        )
    refusals = {
        "speculative decoding": args.speculative_config,
        "a quantized KV cache (--kv-cache-dtype)": args.kv_cache_dtype not in ("auto", None),
        "pipeline parallelism (a later stage's worker writes the tokens the scheduler "
        "sends at their place in the whole stream, past its compact view; use "
        "--tensor-parallel-size)": (args.pipeline_parallel_size or 1) > 1,
        "--no-enable-chunked-prefill (long prompts stream through chunks)": (
            args.enable_chunked_prefill is False
        ),
        "--enable-prompt-embeds (a stream's window is kept as token ids)": (
            args.enable_prompt_embeds
        ),
        "--enable-prefix-caching (evicted, re-rotated KV blocks are not a function of "
        "their token prefix; leave the flag out)": args.enable_prefix_caching,
        "KV connectors (--kv-transfer-config, --kv-offloading-size: they save and load "
        "a request's KV blocks by its token prefix, and a stream's blocks hold its sinks "
        "and a re-rotated window instead)": (
            args.kv_transfer_config is not None or bool(args.kv_offloading_size)
        ),
    }
    for feature, requested in refusals.items():
        if requested:
            raise StreamingConfigError(f"vllm-sink streaming does not support {feature}")
    if isinstance(args.max_model_len, int) and args.max_model_len > UNLIMITED_STREAM_LEN:
        raise StreamingConfigError(
            f"--max-model-len {args.max_model_len} is above the {UNLIMITED_STREAM_LEN} tokens "
            "vllm-sink allows; leave it out and streams have no length limit"
        )

    args.worker_cls = worker
    args.scheduler_cls = SCHEDULER
    logger.info("vllm-sink: --worker-cls %s --scheduler-cls %s", worker, SCHEDULER)
    if args.enable_prefix_caching is None:
        logger.info("vllm-sink: prefix caching is off for streams")
        args.enable_prefix_caching = False
    if args.max_model_len is None:
        args.max_model_len = UNLIMITED_STREAM_LEN


@contextlib.contextmanager
def long_streams_allowed() -> Iterator[None]:
    """Let ``max_model_len`` pass the model's context while the config is derived.

    Streams run past the context by design: their RoPE positions stay within the
    cache (checked in :func:`check_engine_config`), not within the text. Scoped
    so that engines without streaming in the same process keep vLLM's check.
    """
    key = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"
    before = os.environ.get(key)
    os.environ[key] = "1"
    reread_vllm_envs()
    answer = StreamLengthAnswer()
    vllm_config_logger = logging.getLogger("vllm.config.model")
    vllm_config_logger.addFilter(answer)
    try:
        yield
    finally:
        vllm_config_logger.removeFilter(answer)
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before
        reread_vllm_envs()


class StreamLengthAnswer(logging.Filter):
    """vLLM warns that a ``max_model_len`` past the model's context lets positions
    "lead to nan": true of positions in the text, not of a stream's, which stay
    within the cache. Its warning becomes this answer, at info level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(f"User-specified max_model_len ({UNLIMITED_STREAM_LEN})"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = (
                "vllm-sink: max_model_len %d is how long a stream may grow; its RoPE positions "
                "stay within the cache (its span is checked against the model's context below), "
                "so vLLM's warning about positions past the context does not apply"
            )
            record.args = (UNLIMITED_STREAM_LEN,)
        return True


def position_overshoot(config: VllmConfig) -> int:
    """How many positions the cache would use past the model's trained range."""
    return streaming_policy(config).max_position + 1 - trained_positions(config)


def fitting_chunk_size(config: VllmConfig) -> int | None:
    """A smaller prefill chunk size that keeps positions in range.

    ``None`` when the chunk size is not the problem (positions fit already), or
    when no chunk of at least one block would fit: the window is too large.
    """
    policy = streaming_policy(config)
    overshoot = position_overshoot(config)
    chunk = policy.max_chunk_tokens - overshoot
    if overshoot <= 0 or chunk < policy.block_size:
        return None
    return chunk


def check_engine_config(config: VllmConfig) -> None:
    model = config.model_config
    problem = model_refusal(model)
    if problem is not None:
        raise StreamingConfigError(
            f"vllm-sink cannot stream {model.model}: the model has {problem}. "
            "Supported: decoder-only RoPE models with full or sliding-window attention (see "
            "the README's model table)."
        )
    problem = window_refusal(model, streaming_policy(config).window)
    if problem is not None:
        raise StreamingConfigError(f"vllm-sink: {problem}")
    backend = config.attention_config.backend
    if backend is not None:
        from vllm.platforms import current_platform

        check_attention_backend(current_platform.device_type, getattr(backend, "name", backend))
    policy = streaming_policy(config)
    overshoot = position_overshoot(config)
    if overshoot > 0:
        max_window = policy.window - overshoot
        max_chunk = policy.max_chunk_tokens - overshoot
        fixes = (
            [f"--streaming-window to at most {max_window}"]
            if max_window >= policy.block_size
            else []
        )
        if max_chunk >= policy.block_size:
            fixes.append(f"--max-num-batched-tokens to at most {max_chunk}")
        raise StreamingConfigError(
            f"a streaming cache of {policy.sinks} sinks + {policy.window} window tokens, "
            f"with {policy.block_size}-token blocks and prefill chunks of up to "
            f"{policy.max_chunk_tokens} tokens, spans {policy.max_cached_tokens} positions, "
            f"past the {trained_positions(config)} positions {model.model} was trained on. Lower "
            + (" or ".join(fixes) if fixes else "--streaming-window and --max-num-batched-tokens")
            + "."
        )
    logger.info(
        "vllm-sink: streaming on: %d sinks + a window of %d tokens (+ up to %d while "
        "decoding, %d with %d-token prefill chunks), block size %d, at most %d KV "
        "blocks per stream in each full-attention layer group, a cache of %d positions; %s",
        policy.sinks,
        policy.window,
        policy.max_decode_window_slack,
        policy.max_window_slack,
        policy.max_chunk_tokens,
        policy.block_size,
        policy.max_resident_blocks,
        policy.max_cached_tokens,
        f"streams have no length limit; requests without max_tokens stop after "
        f"{default_max_tokens(config)} tokens (the model's context)"
        if model.max_model_len >= UNLIMITED_STREAM_LEN
        else f"streams stop at {model.max_model_len} tokens (--max-model-len)",
    )
