"""A prompt that no snapshot resumes, computed in O(W): its sinks and its last window only.

Streaming a prompt of ``L`` tokens computes all ``L`` of them, so that the
window's KV is what a stream over the whole history holds. With
``--streaming-uncached-prompts window`` a prompt longer than ``S + W`` is *cut*:
the ``L - S - W`` tokens after its sinks are left out, and the stream over the
cut prompt is the stream of a history whose middle was evicted before the
window was computed (the paper's "sliding window with re-computation", with
sinks). A snapshot that resumes the prompt is used instead only if it leaves
no more than ``S + W`` tokens to compute.

The scheduler cuts the request's own tokens, so the worker, the KV managers
and the parity with the reference see a plain stream of the cut prompt. A
snapshot of a cut stream is keyed by the request's whole tokens and records how
many it skipped: the next turn, which sends the whole history again, resumes
it and is cut the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_sink.core.policy import SinkWindowPolicy


def tokens_to_cut(policy: SinkWindowPolicy, num_tokens: int, num_prompt_tokens: int) -> int:
    """How many tokens after the sinks a request of ``num_tokens`` leaves out.

    Everything but the sinks and the last ``W`` tokens, within the prompt (a
    preempted request's tokens include its output): at least one prompt token
    after the sinks is kept. ``0`` when the request has no more than ``S + W``.
    """
    cut = min(num_tokens - policy.sinks - policy.window, num_prompt_tokens - policy.sinks - 1)
    return max(0, cut)


def cut_tokens(tokens: Sequence[int], sinks: int, cut: int) -> list[int]:
    """``tokens`` without the ``cut`` tokens after the first ``sinks``."""
    return [*tokens[:sinks], *tokens[sinks + cut :]]


@dataclass(frozen=True)
class CutPrompt:
    """A request whose prompt was cut: what it was, and how many tokens it skipped."""

    whole_prompt: tuple[int, ...]
    cut: int

    def whole_tokens(self, output_tokens: Sequence[int]) -> list[int]:
        """The request's tokens as its client sent them, with its output so far."""
        return [*self.whole_prompt, *output_tokens]
