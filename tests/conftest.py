"""Shared set-up: environment for vLLM's CPU backend, models, engines."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

# vLLM's CPU backend sizes the KV cache from NUMA node 0 (about 9 GiB here) and
# fails its utilisation check unless the size is explicit. Engines run in this
# process so that tests can inspect the scheduler's KV cache manager.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402

# The shared checks' asserts report their operands, as the tests' own do.
pytest.register_assert_rewrite("vllm_sink_dev")

from vllm_sink_dev.engines import shutdown  # noqa: E402
from vllm_sink_dev.paths import GEMMA3, SMOLLM2, TEXT  # noqa: E402
from vllm_sink_dev.tiny_llama import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    """Two sliding-window layers and a global one: a hybrid model, with KV groups of each kind."""
    from vllm_sink_dev.families import build_tiny

    return build_tiny("gemma3", tmp_path_factory.mktemp("tiny_gemma3"), max_positions=256)


@pytest.fixture(scope="session", params=["llama", "gemma3"])
def tiny_model(request) -> Path:
    """The tiny Llama, then the tiny Gemma 3 (:func:`tiny_gemma3`)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (SMOLLM2 / "config.json").exists():
        pytest.fail(f"{SMOLLM2} is missing: run ./setup.sh first")
    return SMOLLM2


@pytest.fixture(scope="session")
def gemma3() -> Path:
    if not (GEMMA3 / "config.json").exists():
        pytest.fail(f"{GEMMA3} is missing: run ./setup.sh first")
    return GEMMA3


@pytest.fixture(scope="session")
def handbook_tokens(smollm2) -> list[int]:
    from transformers import AutoTokenizer

    if not TEXT.exists():
        pytest.fail(f"{TEXT} is missing: run ./setup.sh first")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return tokenizer(TEXT.read_text()[:400_000])["input_ids"]


@pytest.fixture
def engine_factory() -> Iterator:
    """``make(model, **LLM kwargs)`` starts a real vLLM engine, eager, in-process;
    ``make.stop(llm)`` stops one before the test ends."""
    from vllm import LLM

    started = []

    def make(model: Path, **kwargs):
        kwargs.setdefault("enforce_eager", True)
        llm = LLM(str(model), **kwargs)
        started.append(llm)
        return llm

    def stop(llm) -> None:
        """Stop one engine now (the caller drops its references)."""
        started.remove(llm)
        shutdown(llm)

    make.stop = stop
    yield make
    while started:  # popped first: nothing here keeps the engine's memory alive
        shutdown(started.pop())
    gc.collect()  # what shutdown's caller held while it ran


ENGINE_TIER = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests without an engine run first: a failure among them ends the run before the
    engine tier's half hour (:func:`pytest_runtest_protocol`)."""
    items.sort(key=lambda item: item.get_closest_marker("engine") is not None)  # stable


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem) -> bool | None:
    session = item.session
    if item.get_closest_marker("engine") is None or item.config.stash.get(ENGINE_TIER, False):
        return None
    item.config.stash[ENGINE_TIER] = True  # the first engine test: the fast tier is done
    if session.testsfailed:
        session.shouldstop = f"{session.testsfailed} fast test(s) failed: engine tests not run"
        return True  # not run; the run stops here
    return None
