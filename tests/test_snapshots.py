"""A request that continues a finished stream resumes it (a snapshot) instead of streaming again.

Checked against the torch reference: a resumed stream must be the same stream
continued, every token of the new request seeing the sinks and window that one
uninterrupted stream over the same tokens, with the same steps, would see.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref

import pytest
import torch
from vllm import SamplingParams

from vllm_sink_dev.engines import FP32_TOLERANCE, random_prompt, tiny_streaming_engine
from vllm_sink_dev.families import GEMMA3_TINY_SLIDING_WINDOW
from vllm_sink_dev.reference import (
    StreamingLlamaReference,
    first_unchanged_step_start,
    window_starts_of_steps,
)
from vllm_sink_dev.schedule_log import ScheduleLog

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 128


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True, detokenize=False
    )


def run(engine, requests: dict[str, list[int]], max_tokens: int) -> dict[str, list]:
    """Serve ``requests`` together; each request's generated tokens and their logprobs."""
    for req_id, prompt in requests.items():
        engine.add_request(req_id, {"prompt_token_ids": prompt}, greedy(max_tokens))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                completion = out.outputs[0]
                logprobs = [d[t].logprob for d, t in zip(completion.logprobs, completion.token_ids)]
                done[out.request_id] = (list(completion.token_ids), logprobs)
    return done


def expected_logprobs(ref, tokens, steps, generated_from: int) -> torch.Tensor:
    """The reference's logprob of each token from ``generated_from`` on, for these steps.

    Steps past ``tokens`` (another branch's, computed before this one parted) are cut.
    """
    steps = [(n, min(k, len(tokens) - n)) for n, k in steps if n < len(tokens)]
    table = ref.logprobs(tokens, SINKS, window_starts_of_steps(steps, SINKS, WINDOW, BLOCK))
    return torch.tensor(
        [table[p - 1, tokens[p]].item() for p in range(generated_from, len(tokens))]
    )


def assert_second_turns_continue_their_first(
    ref, firsts, outs, seconds, outs2, log, first_log=None
) -> None:
    """Each second turn (``x2``) resumed its first turn's (``x1``) stream where that ended,
    and every token matches one uninterrupted stream over both turns."""
    first_log = first_log or log
    for req_id, prompt in seconds.items():
        first = req_id[0] + "1"
        assert log.of(req_id)[0][0] == len(firsts[first]) + len(outs[first][0]) - 1, req_id
        generated, got = outs2[req_id]
        steps = first_log.of(first) + log.of(req_id)
        expected = expected_logprobs(ref, prompt + generated, steps, len(prompt))
        assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE, req_id


@pytest.fixture
def engine(tiny_model, engine_factory):
    llm = tiny_streaming_engine(engine_factory, tiny_model, SINKS, WINDOW, BLOCK, CHUNK)
    return llm.llm_engine


def test_next_turn_resumes_the_stream_as_one_uninterrupted_stream(engine, tiny_model):
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    pool = core.scheduler.streaming.block_pool
    free_at_start = pool.get_num_free_blocks()
    hits_before = core.scheduler.snapshot_hits

    first = random_prompt(300, seed=41)
    out1, _ = run(engine, {"t1": first}, 150)["t1"]
    second = first + out1 + random_prompt(40, seed=42)
    out2, got = run(engine, {"t2": second}, 120)["t2"]

    steps1, steps2 = log.of("t1"), log.of("t2")
    computed_by_t1 = len(first) + len(out1) - 1  # the last sampled token has no KV yet
    assert steps2[0][0] == computed_by_t1  # resumed: prefilled only the rest
    assert core.scheduler.snapshot_hits == hits_before + 1
    ref = StreamingLlamaReference(tiny_model)
    expected = expected_logprobs(ref, second + out2, steps1 + steps2, len(second))
    assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE
    assert computed_by_t1 > SINKS + WINDOW + 4 * BLOCK  # the first turn evicted
    assert pool.get_num_free_blocks() == free_at_start  # snapshots' blocks count as free


def test_branches_of_a_chat_resume_from_the_same_snapshots(engine, tiny_model):
    """Regenerate, an edited last message, the next turn from two tabs at once and
    ``n = 2`` samples each resume from a snapshot of the turn they continue (which
    outlives the requests that resume it): a regenerate from its prompt's, an edit at
    least from the turn before; every token of every branch matches one uninterrupted
    stream over that branch."""
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    pool = core.scheduler.streaming.block_pool
    free_at_start = pool.get_num_free_blocks()
    first = random_prompt(300, seed=51)
    out1, _ = run(engine, {"t1": first}, 150)["t1"]
    second = first + out1 + random_prompt(40, seed=52)
    out2, _ = run(engine, {"t2": second}, 100)["t2"]
    hits_before = core.scheduler.snapshot_hits

    branches = {  # branch: (prompt, the turn whose snapshots it resumes)
        "regenerate": (second, "t2 prompt"),
        "edit": (first + out1 + random_prompt(35, seed=53), "t1"),
        "next": (second + out2 + random_prompt(20, seed=54), "t2"),
        "second-tab": (second + out2 + random_prompt(20, seed=54), "t2"),
    }
    outs = run(engine, {b: prompt for b, (prompt, _) in branches.items()}, 60)
    sampled = SamplingParams(
        n=2, temperature=1.0, seed=7, max_tokens=40, logprobs=0, ignore_eos=True, detokenize=False
    )
    engine.add_request("samples", {"prompt_token_ids": branches["next"][0]}, sampled)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                for completion in out.outputs:
                    ids = list(completion.token_ids)
                    logprobs = [d[t].logprob for d, t in zip(completion.logprobs, ids)]
                    outs[f"{completion.index}_samples"] = (ids, logprobs)
                    branches[f"{completion.index}_samples"] = branches["next"]
    assert core.scheduler.snapshot_hits == hits_before + 6

    ref = StreamingLlamaReference(tiny_model)
    computed_by = {
        "t1": len(first) + len(out1) - 1,
        "t2 prompt": len(second) - 1,  # the prompt's last token is computed again
        "t2": len(second) + len(out2) - 1,
    }
    for branch, (prompt, continues) in branches.items():
        steps = log.of(branch)
        assert steps[0][0] >= computed_by[continues], branch  # resumed: prefilled the rest
        if branch == "regenerate":
            assert steps[0][0] == computed_by[continues]
        generated, got = outs[branch]
        history = log.of("t1") + log.of("t2")
        if branch.endswith("samples"):  # they may resume the next turn's prompt snapshot
            history += log.of("next")
        expected = expected_logprobs(ref, prompt + generated, history + steps, len(prompt))
        assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE, branch
    assert pool.get_num_free_blocks() == free_at_start  # copies freed, snapshots free


def test_conversations_sharing_an_opening_each_resume_their_own(engine, tiny_model):
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    opening = random_prompt(200, seed=56)
    firsts = {
        "x1": opening + random_prompt(30, seed=57),
        "y1": opening + random_prompt(30, seed=58),
    }
    outs = run(engine, firsts, 100)
    seconds = {
        "x2": firsts["x1"] + outs["x1"][0] + random_prompt(20, seed=59),
        "y2": firsts["y1"] + outs["y1"][0] + random_prompt(20, seed=60),
    }
    outs2 = run(engine, seconds, 60)
    ref = StreamingLlamaReference(tiny_model)
    assert_second_turns_continue_their_first(ref, firsts, outs, seconds, outs2, log)


def test_preempted_or_aborted_resumed_requests_lose_nothing(engine, tiny_model):
    """A resumed stream preempted mid-flight recomputes its whole history; one aborted
    leaves its stream for the next request; no block leaks."""
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    pool = core.scheduler.streaming.block_pool
    free_at_start = pool.get_num_free_blocks()
    ref = StreamingLlamaReference(tiny_model)

    first = random_prompt(300, seed=71)
    out1, _ = run(engine, {"t1": first}, 150)["t1"]

    # t2 continues t1 and is preempted (with a plain request beside it) while decoding.
    second = first + out1 + random_prompt(40, seed=72)
    engine.add_request("t2", {"prompt_token_ids": second}, greedy(120))
    engine.add_request("u", {"prompt_token_ids": random_prompt(200, seed=73)}, greedy(100))
    finished, step = {}, 0
    while engine.has_unfinished_requests():
        if step == 30:
            assert engine.reset_prefix_cache(reset_running_requests=True)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
        step += 1
    out2 = list(finished["t2"].token_ids)
    got2 = [d[t].logprob for d, t in zip(finished["t2"].logprobs, out2)]
    steps2 = log.of("t2")
    restart = next(i for i, (n, _) in enumerate(steps2) if n == 0)
    lives = [log.of("t1") + steps2[:restart], steps2[restart:]]
    assert steps2[0][0] > 0 and lives[0][-1][0] > len(second)  # resumed, preempted decoding
    expected = ref.sampled_logprobs(second + out2, len(second), lives, SINKS, WINDOW, BLOCK)
    assert (torch.tensor(got2) - expected).abs().max() < FP32_TOLERANCE

    # t3 continues t2 and is aborted after 20 tokens; t4 continues what t3 had sent.
    third = second + out2 + random_prompt(30, seed=74)
    engine.add_request("t3", {"prompt_token_ids": third}, greedy(1000))
    sent: list[int] = []
    while len(sent) < 20:
        for out in engine.step():
            sent = list(out.outputs[0].token_ids)
    engine.abort_request([log.internal_id("t3")], internal=True)
    assert not engine.has_unfinished_requests()
    hits_before = core.scheduler.snapshot_hits
    fourth = third + sent + random_prompt(20, seed=75)
    out4, got4 = run(engine, {"t4": fourth}, 60)["t4"]
    assert core.scheduler.snapshot_hits == hits_before + 1
    steps = steps2[restart:] + log.of("t3") + log.of("t4")
    expected = expected_logprobs(ref, fourth + out4, steps, len(fourth))
    assert (torch.tensor(got4) - expected).abs().max() < FP32_TOLERANCE
    assert pool.get_num_free_blocks() == free_at_start  # nothing leaked


def test_a_reply_that_comes_back_changed_resumes_where_it_changed_or_at_its_prompt(
    engine, tiny_model
):
    """A client's re-tokenized text may change tokens of the previous reply: the stream
    resumes where the prompt parts from it, if no eviction came after that point (the
    cache there is the cache of the stream cut there); otherwise at the end of the
    previous prompt (its snapshot, copied when the prompt was computed)."""
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    first = random_prompt(300, seed=81)
    out1, _ = run(engine, {"t1": first}, 100)["t1"]
    steps1 = log.of("t1")
    sliding = GEMMA3_TINY_SLIDING_WINDOW if "gemma" in str(tiny_model) else None
    unchanged_from = first_unchanged_step_start(steps1, SINKS, WINDOW, BLOCK, sliding)
    computed = len(first) + len(out1) - 1
    assert len(first) < unchanged_from < computed - 2

    def parting_at(n: int, seed: int) -> list[int]:
        history = first + out1
        changed = 3 if history[n] != 3 else 4
        return history[:n] + [changed] + random_prompt(30, seed=seed)

    ref = StreamingLlamaReference(tiny_model)
    for req_id, parts_at in (("t2", computed - 1), ("t3", unchanged_from + 1)):
        prompt = parting_at(parts_at, seed=82)
        generated, got = run(engine, {req_id: prompt}, 40)[req_id]
        assert log.of(req_id)[0][0] == parts_at, req_id
        expected = expected_logprobs(ref, prompt + generated, steps1 + log.of(req_id), len(prompt))
        assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE, req_id
    prompt = parting_at(unchanged_from - 1, seed=83)
    generated, got = run(engine, {"t4": prompt}, 10)["t4"]
    assert log.of("t4")[0][0] == len(first)  # the reply's snapshot held blocks evicted later
    expected = expected_logprobs(ref, prompt + generated, steps1 + log.of("t4"), len(prompt))
    assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE


def test_snapshots_the_pool_gives_up_resume_from_host_memory(tiny_model, engine_factory):
    """With room for one snapshot in the pool, the other conversation's goes to host
    memory and its next turn is restored from there: the same stream, continued."""
    host_bytes = 4 * 2**20
    config = {"streaming_snapshots": 1, "streaming_snapshot_host_size": host_bytes / 2**30}
    llm = tiny_streaming_engine(
        engine_factory, tiny_model, SINKS, WINDOW, BLOCK, CHUNK, settings=config
    )
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    firsts = {"a1": random_prompt(300, seed=91), "b1": random_prompt(280, seed=92)}
    outs = run(engine, firsts, 120)
    seconds = {name[0] + "2": firsts[name] + outs[name][0] + random_prompt(30, seed=93)
               for name in firsts}  # fmt: skip
    outs2 = {**run(engine, {"b2": seconds["b2"]}, 60), **run(engine, {"a2": seconds["a2"]}, 60)}
    assert core.scheduler.tier_hits == {"pool": 1, "host": 1}  # b1 from the pool, a1 from host

    ref = StreamingLlamaReference(tiny_model)
    assert_second_turns_continue_their_first(ref, firsts, outs, seconds, outs2, log)
    vault = core.model_executor.driver_worker.worker.model_runner._snapshots
    assert 0 < vault.host_bytes <= host_bytes


def test_a_restarted_engine_resumes_its_conversations_from_disk(
    tiny_model, engine_factory, tmp_path
):
    """Snapshots written by one engine let the next one (a restart, another replica) resume
    each conversation: the same stream continued, per tenant (``cache_salt``)."""
    settings = {"streaming_snapshot_dir": str(tmp_path / "snapshots")}
    start = lambda: tiny_streaming_engine(  # noqa: E731
        engine_factory, tiny_model, SINKS, WINDOW, BLOCK, CHUNK, settings=settings
    )
    firsts = {"a1": random_prompt(300, seed=101), "b1": random_prompt(260, seed=102)}
    salts = {"a": None, "b": "tenant-b"}

    def run_salted(engine, prompts, max_tokens):
        for req_id, prompt in prompts.items():
            salt = salts[req_id[0]] if len(req_id) == 2 else "tenant-c"
            inputs = {"prompt_token_ids": prompt, **({"cache_salt": salt} if salt else {})}
            engine.add_request(req_id, inputs, greedy(max_tokens))
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    ids = list(out.outputs[0].token_ids)
                    logprobs = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, ids)]
                    done[out.request_id] = (ids, logprobs)
        engine.step()  # the step that tells the worker which requests finished (and what to keep)
        return done

    llm = start()
    first_log = ScheduleLog(llm.llm_engine.engine_core.engine_core.scheduler)
    outs = run_salted(llm.llm_engine, firsts, 120)
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    assert worker.model_runner._snapshots.flush(timeout_s=60)
    del worker
    assert len(list((tmp_path / "snapshots").rglob("*.snap"))) == 2
    engine_factory.stop(llm)
    del llm

    engine = start().llm_engine
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    seconds = {r[0] + "2": firsts[r] + outs[r][0] + random_prompt(30, seed=103) for r in firsts}
    seconds["b2-other-tenant"] = seconds["b2"]
    outs2 = run_salted(engine, seconds, 60)
    assert core.scheduler.tier_hits == {"disk": 2}
    assert log.of("b2-other-tenant")[0][0] == 0  # another tenant's stream is not resumed
    ref = StreamingLlamaReference(tiny_model)
    tenants_own = {r: seconds[r] for r in ("a2", "b2")}
    assert_second_turns_continue_their_first(ref, firsts, outs, tenants_own, outs2, log, first_log)


def test_an_engine_stopped_in_a_running_process_frees_its_snapshot_writer(
    tiny_llama, engine_factory, tmp_path
):
    """The offline ``LLM`` stopped while its process goes on (a notebook, a Ray task): the
    background writer of snapshot files must not keep the worker, and so its KV pool, alive."""
    before = set(threading.enumerate())
    llm = tiny_streaming_engine(
        engine_factory, tiny_llama, SINKS, WINDOW, BLOCK, CHUNK,
        settings={"streaming_snapshot_dir": str(tmp_path / "snapshots")},
    )  # fmt: skip
    for seed in (201, 202):  # the second call's step keeps the first's snapshot
        llm.generate([{"prompt_token_ids": random_prompt(200, seed)}], greedy(4))
    new_threads = set(threading.enumerate()) - before
    (writer,) = (t for t in new_threads if t.name == "vllm-sink-writer")
    assert list((tmp_path / "snapshots").rglob("*.snap"))
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    vault = weakref.ref(runner._snapshots)
    del runner
    engine_factory.stop(llm)
    del llm
    # pytest keeps the test's log records; vLLM's renderer warm-up logs the absent tokenizer
    # (skip_tokenizer_init) with its traceback, whose frames hold the engine.
    for handler in logging.getLogger().handlers:
        for record in getattr(handler, "records", ()):
            record.exc_info = None
    gc.collect()
    writer.join(timeout=10)
    assert vault() is None and not writer.is_alive()
