"""The worker's compact view of a stream, against the resident set spelled out."""

from __future__ import annotations

import itertools

import pytest

from vllm_sink.core.stream_view import StreamView


def resident(tokens: list[int], sinks: int, shift: int) -> list[int]:
    """Tokens still cached: the sinks, then everything after the evicted gap."""
    return tokens[:sinks] + tokens[sinks + shift :]


CASES = [
    (sinks, shift, prompt_len, outputs)
    for sinks, shift, prompt_len, outputs in itertools.product(
        [0, 1, 4], [0, 32, 96], [0, 2, 5, 40, 300], [0, 3, 50, 200]
    )
    if prompt_len + outputs >= sinks + shift  # the policy never evicts past the end
]


@pytest.mark.parametrize("sinks, shift, prompt_len, outputs", CASES)
def test_view_holds_exactly_the_resident_tokens(sinks, shift, prompt_len, outputs):
    prompt = list(range(1000, 1000 + prompt_len))
    produced = list(range(5000, 5000 + outputs))
    view = StreamView(sinks, shift, prompt_len)
    expected = resident(prompt + produced, sinks, shift)

    kept = list(produced)
    first = view.first_droppable_output
    del kept[first : first + view.dropped_outputs]
    assert kept == [t for t in expected if t >= 5000]
    assert view.resident_prompt_len == sum(t < 5000 for t in expected)

    assert view.tokens(prompt, kept, 0, len(expected)) == expected
    for start, stop in [(0, sinks), (sinks, len(expected)), (1, len(expected) - 1)]:
        assert view.tokens(prompt, kept, start, stop) == expected[start:stop]
    for index, token in enumerate(expected):
        assert (prompt + produced)[view.absolute(index)] == token


def test_outputs_dropped_in_steps_match_dropping_at_once():
    """The runner trims the kept outputs at each eviction, not all at once."""
    sinks, prompt_len = 4, 10
    produced = list(range(100, 400))
    kept = list(produced)
    before = StreamView(sinks, 0, prompt_len)
    for shift in range(32, 289, 32):
        view = StreamView(sinks, shift, prompt_len)
        first = view.first_droppable_output
        del kept[first : first + view.dropped_outputs - before.dropped_outputs]
        before = view
    everything = list(range(prompt_len)) + produced
    assert kept == [t for t in resident(everything, sinks, 288) if t >= 100]
