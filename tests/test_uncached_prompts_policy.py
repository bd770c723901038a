"""Which tokens a prompt no snapshot resumes leaves out, and finding a cut stream's snapshot."""

from __future__ import annotations

import pytest

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.snapshots import SnapshotIndex
from vllm_sink.core.uncached_prompts import CutPrompt, cut_tokens, tokens_to_cut

POLICY = SinkWindowPolicy(sinks=4, window=64, block_size=32, max_chunk_tokens=128)


@pytest.mark.parametrize(
    "num_tokens,num_prompt_tokens,cut",
    [
        (68, 68, 0),  # S + W: nothing to leave out
        (69, 69, 1),
        (1000, 1000, 932),  # the last W after the sinks are kept
        (1000, 900, 895),  # a preempted request's output is never cut: one prompt token kept
        (70, 4, 0),  # a prompt of sinks only
    ],
)
def test_a_prompt_keeps_its_sinks_and_its_last_window(num_tokens, num_prompt_tokens, cut):
    assert tokens_to_cut(POLICY, num_tokens, num_prompt_tokens) == cut


def test_cut_tokens_are_the_sinks_then_the_tail():
    tokens = list(range(100))
    assert cut_tokens(tokens, 4, 30) == [0, 1, 2, 3, *range(34, 100)]
    assert cut_tokens(tokens, 0, 30) == list(range(30, 100))
    assert CutPrompt(tuple(tokens[:50]), 10).whole_tokens([7, 8]) == [*tokens[:50], 7, 8]


def test_a_cut_streams_snapshot_is_found_by_the_whole_tokens_and_sized_by_its_stream():
    index = SnapshotIndex(block_size=32, salt=b"engine")
    whole = list(range(1000, 1700))  # 700 tokens, 600 of them cut
    snapshot = index.make(whole, "", resumable_from=4 + 600 + 40, shift=0, freed_until=(1,),
                          skipped=600)  # fmt: skip
    index.add(snapshot)
    assert snapshot.row_length == 4  # 100 stream tokens
    assert snapshot.stream_length(snapshot.num_tokens) == 100
    next_turn = [*whole, 5, 6, 7]
    found, length = index.find(next_turn, "", max_tokens=len(next_turn) - 1)
    assert (found, length) == (snapshot, 700)
    assert index.find(whole[:600], "", max_tokens=599) is None  # parts inside the cut
    assert index.find(next_turn, "other tenant", max_tokens=702) is None
