"""Flags, additional_config and start-up refusals (no engine is started)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

from vllm_sink.config import (
    UNLIMITED_STREAM_LEN,
    StreamingConfigError,
    StreamingSettings,
    streaming_policy,
    streaming_settings,
)
from vllm_sink.frontend.model_support import model_refusal, window_refusal
from vllm_sink.worker.streaming_worker import worker_config


def parse_serve_args(argv: list[str]):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return parser, parser.parse_args(["--model", "m", *argv])


def test_serve_flags_land_in_additional_config():
    parser, args = parse_serve_args(["--streaming-sinks", "4", "--streaming-window", "1020"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {"streaming_sinks": 4, "streaming_window": 1020}
    assert "Streaming (vllm-sink)" in parser.format_help()
    _, args = parse_serve_args(["--streaming-sinks", "4", "--streaming-snapshot-host-size", "2.5"])
    settings = StreamingSettings.from_additional_config(
        AsyncEngineArgs.from_cli_args(args).additional_config
    )
    assert settings.host_size == 2.5
    _, args = parse_serve_args(
        ["--streaming-sinks", "4", "--streaming-snapshot-dir", "/srv/snapshots",
         "--streaming-snapshot-dir-size", "40"]
    )  # fmt: skip
    settings = StreamingSettings.from_additional_config(
        AsyncEngineArgs.from_cli_args(args).additional_config
    )
    assert (settings.directory, settings.dir_size) == ("/srv/snapshots", 40)
    assert settings.uncached_prompts == "stream"
    _, args = parse_serve_args(["--streaming-sinks", "4", "--streaming-uncached-prompts", "window"])
    settings = StreamingSettings.from_additional_config(
        AsyncEngineArgs.from_cli_args(args).additional_config
    )
    assert settings.uncached_prompts == "window"


def test_flags_merge_with_other_additional_config():
    _, args = parse_serve_args(
        ["--streaming-sinks", "0", "--additional-config", json.dumps({"other": 1})]
    )
    assert AsyncEngineArgs.from_cli_args(args).additional_config == {
        "other": 1,
        "streaming_sinks": 0,
    }


def test_no_flags_no_streaming():
    _, args = parse_serve_args([])
    assert AsyncEngineArgs.from_cli_args(args).additional_config == {}
    assert StreamingSettings.from_additional_config({}) is None


def test_sinks_alone_turn_streaming_on_with_default_window():
    assert StreamingSettings.from_additional_config({"streaming_sinks": 4}) == StreamingSettings(
        4, 1020
    )


@pytest.mark.parametrize(
    "config,message",
    [
        ({"streaming_sinks": -1}, "--streaming-sinks .* must be 0 or more"),
        ({"streaming_window": 0}, "--streaming-window .* must be at least 1"),
        ({"streaming_sinks": "four"}, "--streaming-sinks .* must be an integer"),
        ({"streaming_sink": 4}, "unknown streaming setting 'streaming_sink'"),
        (
            {"streaming_sinks": 4, "streaming_snapshot_host_size": -1},
            "--streaming-snapshot-host-size .* 0 \\(off\\) or more GiB",
        ),
        (
            {"streaming_sinks": 4, "streaming_snapshot_host_size": float("nan")},
            "--streaming-snapshot-host-size .* 0 \\(off\\) or more GiB",
        ),
        (
            {"streaming_sinks": 4, "streaming_snapshot_host_size": "lots"},
            "--streaming-snapshot-host-size .* a size in GiB",
        ),
        (
            {"streaming_sinks": 4, "streaming_snapshots": 0, "streaming_snapshot_host_size": 1},
            "--streaming-snapshot-host-size .* needs --streaming-snapshots above 0",
        ),
        ({"streaming_snapshot_host_size": 1}, "host-size .* applies to streaming"),
        (
            {"streaming_sinks": 4, "streaming_snapshot_dir": 5},
            "--streaming-snapshot-dir .* must be a path",
        ),
        (
            {"streaming_sinks": 4, "streaming_snapshot_dir_size": 2},
            "--streaming-snapshot-dir-size .* give the directory too",
        ),
        (
            {
                "streaming_sinks": 4,
                "streaming_snapshot_dir": "/x",
                "streaming_snapshot_dir_size": -2,
            },
            "--streaming-snapshot-dir-size .* 0 \\(off\\) or more GiB",
        ),
        (
            {"streaming_sinks": 4, "streaming_snapshots": 0, "streaming_snapshot_dir": "/x"},
            "--streaming-snapshot-dir .* needs --streaming-snapshots above 0",
        ),
        (
            {"streaming_sinks": 4, "streaming_uncached_prompts": "drop"},
            "--streaming-uncached-prompts .* must be one of stream, window \\(got 'drop'\\)",
        ),
    ],
)
def test_bad_values_are_refused(config, message):
    with pytest.raises(StreamingConfigError, match=message):
        StreamingSettings.from_additional_config(config)


def engine_config(model, **kwargs):
    kwargs.setdefault("skip_tokenizer_init", True)
    return EngineArgs(model=str(model), **kwargs).create_engine_config()


@pytest.mark.parametrize(
    "settings,extra,message",
    [
        ({"streaming_sinks": -2}, {}, "must be 0 or more"),
        ({"streaming_sinks": 4, "streaming_window": 4000}, {}, "past the 2048 positions"),
        (
            {"streaming_sinks": 4, "streaming_window": 1000},
            {"max_num_batched_tokens": 2048},
            "Lower --max-num-batched-tokens to at most 918",
        ),
        (
            {"streaming_sinks": 40, "streaming_window": 256},
            {"block_size": 32},
            "sinks .* block size",
        ),
        (
            {"streaming_sinks": 4, "streaming_window": 16},
            {"block_size": 32},
            "at least the KV block size",
        ),
        (
            {"streaming_sinks": 4, "streaming_window": 64},
            {"kv_cache_dtype": "fp8"},
            "quantized KV cache",
        ),
        (
            {"streaming_sinks": 4, "streaming_window": 64},
            {"pipeline_parallel_size": 2},
            "pipeline parallelism .* use --tensor-parallel-size",
        ),
        ({"streaming_sinks": 4}, {"enable_prompt_embeds": True}, "--enable-prompt-embeds"),
        ({"streaming_sinks": 4}, {"enable_prefix_caching": True}, "--enable-prefix-caching"),
        ({"streaming_sinks": 4}, {"max_model_len": 2**62}, "--max-model-len .* leave it out"),
        ({"streaming_sinks": 4, "streaming_snapshots": -1}, {}, "--streaming-snapshots .* 0"),
        ({"streaming_snapshots": 8}, {}, "--streaming-snapshots .* applies to streaming"),
        ({"streaming_sinks": 4}, {"scheduler_cls": "my.Scheduler"}, "remove --scheduler-cls"),
        ({"streaming_sinks": 4}, {"worker_cls": "my.Worker"}, "remove --worker-cls"),
        (
            {"streaming_sinks": 4},
            {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
            "KV connectors .*--kv-transfer-config",
        ),
        ({"streaming_sinks": 4}, {"kv_offloading_size": 0.5}, "KV connectors .*--kv-offloading"),
        (
            {"streaming_sinks": 4},
            {"attention_config": {"backend": "FLASH_ATTN"}},
            "through the CPU_ATTN attention backend; remove the choice of FLASH_ATTN",
        ),
    ],
)
def test_bad_settings_fail_at_start_up(tiny_llama, settings, extra, message):
    with pytest.raises(StreamingConfigError, match=message):
        engine_config(tiny_llama, additional_config=settings, **extra)


def test_unsupported_models_are_refused(tmp_path):
    from transformers import GPT2Config, MistralConfig

    sliding = tmp_path / "sliding"
    MistralConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=256,
        vocab_size=512,
    ).save_pretrained(sliding)
    with pytest.raises(StreamingConfigError, match="--streaming-window to at least 256"):
        engine_config(sliding, additional_config={"streaming_sinks": 4, "streaming_window": 128})
    no_rope = tmp_path / "gpt2"
    GPT2Config(n_embd=128, n_layer=1, n_head=2, vocab_size=512).save_pretrained(no_rope)
    with pytest.raises(StreamingConfigError, match="learned absolute position embeddings"):
        engine_config(no_rope, additional_config={"streaming_sinks": 4, "streaming_window": 128})


def hf_model(config) -> SimpleNamespace:
    """What :func:`model_refusal` reads of a vLLM ``ModelConfig``, for a transformers config."""
    return SimpleNamespace(hf_text_config=config, use_mla=False, is_hybrid=False, uses_mrope=False)


def test_each_position_scheme_is_refused_with_its_reason():
    from transformers import (
        BloomConfig,
        FalconConfig,
        GPT2Config,
        GPTJConfig,
        LlamaConfig,
        MptConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
    )  # fmt: skip

    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48,
                "rope_theta": 10000.0}  # fmt: skip
    cases = {
        "ALiBi": [BloomConfig(), MptConfig(), FalconConfig(alibi=True)],
        "learned absolute position embeddings": [GPT2Config(), OPTConfig()],
    }
    for reason, configs in cases.items():
        for config in configs:
            assert reason in (model_refusal(hf_model(config)) or ""), type(config).__name__
    phi3_longrope = Phi3Config(rope_parameters=longrope, original_max_position_embeddings=4096)
    for streams in (LlamaConfig(), Phi3Config(), phi3_longrope, Qwen2Config(), GPTJConfig()):
        assert model_refusal(hf_model(streams)) is None, type(streams).__name__


def test_sliding_window_layers_need_a_streaming_window_that_holds_their_window():
    from transformers import Gemma3TextConfig, Qwen2Config

    gemma = hf_model(Gemma3TextConfig(sliding_window=512))
    assert model_refusal(gemma) is None
    assert "--streaming-window to at least 512" in window_refusal(gemma, 508)
    assert window_refusal(gemma, 512) is None
    assert window_refusal(hf_model(Qwen2Config(use_sliding_window=False)), 64) is None


def test_streaming_settings_shape_the_engine_config(tiny_llama):
    config = engine_config(
        tiny_llama, additional_config={"streaming_sinks": 4, "streaming_window": 256}
    )
    assert config.parallel_config.worker_cls == "vllm_sink.worker.cpu_worker.StreamingCPUWorker"
    scheduler = config.scheduler_config.get_scheduler_cls()
    assert scheduler.__module__ == "vllm_sink.scheduler.scheduler"
    assert config.cache_config.enable_prefix_caching is False
    # No stream length limit; the worker sees sequences as long as the cache.
    assert config.model_config.max_model_len == UNLIMITED_STREAM_LEN
    worker_side = worker_config(config)
    assert worker_side.model_config.max_model_len == streaming_policy(config).view_width
    assert config.model_config.max_model_len == UNLIMITED_STREAM_LEN
    assert worker_side.cache_config is config.cache_config


def test_max_model_len_still_caps_streams_when_given(tiny_llama):
    config = engine_config(
        tiny_llama, additional_config={"streaming_sinks": 4}, max_model_len=100_000
    )
    assert config.model_config.max_model_len == 100_000


def test_streaming_off_leaves_vllm_untouched(tiny_llama):
    patched = engine_config(tiny_llama)
    args = EngineArgs(model=str(tiny_llama), skip_tokenizer_init=True)
    original = EngineArgs.create_engine_config.__wrapped__(args)
    assert patched.compute_hash() == original.compute_hash()
    assert patched.parallel_config.worker_cls == original.parallel_config.worker_cls
    assert patched.scheduler_config.scheduler_cls == original.scheduler_config.scheduler_cls
    assert patched.model_config.max_model_len == original.model_config.max_model_len == 2048


def test_plugin_import_is_light_and_registration_idempotent():
    import subprocess
    import sys

    code = (
        "import sys, vllm_sink; assert 'vllm' not in sys.modules, 'imports vLLM';"
        "vllm_sink.register(); vllm_sink.register();"
        "from vllm.engine.arg_utils import EngineArgs;"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser;"
        "help = EngineArgs.add_cli_args(FlexibleArgumentParser()).format_help();"
        "assert help.count('--streaming-sinks S') == 1, help"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


FUZZED_VALUES = [-1, 0, -(2**70), 2**70, 2**200, 1.5, 4.0, "4.5", "",
                 "x", None, True, [4], {"a": 1}]  # fmt: skip


@pytest.mark.parametrize("key", ["streaming_sinks", "streaming_window", "streaming_snapshots"])
@pytest.mark.parametrize("value", FUZZED_VALUES, ids=repr)
def test_fuzzed_settings_fail_at_start_up_naming_the_setting(tiny_llama, key, value):
    """Any bad value gives the user's error naming the flag and key, never one from vLLM.

    ``streaming_sinks: 0`` is a valid setting (window attention) and is let
    through; so is any whole number of snapshots from 0 (the block pool bounds
    what they hold).
    """
    settings = {key: value}
    if key == "streaming_snapshots":
        settings["streaming_sinks"] = 4
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            config = engine_config(tiny_llama, additional_config=settings)
            assert streaming_settings(config).snapshots == value
            return
    if key == "streaming_sinks" and value == 0 and not isinstance(value, bool):
        config = engine_config(tiny_llama, additional_config=settings)
        assert streaming_policy(config).sinks == 0
        return
    with pytest.raises(StreamingConfigError) as refused:
        engine_config(tiny_llama, additional_config=settings, block_size=32)
    flag = "--" + key.replace("_", "-")
    assert flag in str(refused.value) or key.replace("_", " ") in str(refused.value)


@pytest.mark.parametrize("argv", [["--streaming-sinks", "x"], ["--streaming-window", "1.5"]])
def test_non_integer_flags_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parse_serve_args(argv)
    assert f"argument {argv[0]}: invalid int value" in capsys.readouterr().err
