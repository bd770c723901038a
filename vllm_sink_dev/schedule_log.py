"""What the scheduler ran: every step's start and size per request, for the reference."""

from __future__ import annotations

from collections import defaultdict


class ScheduleLog:
    """Every step's ``(tokens computed before, tokens computed)`` per request, in order."""

    def __init__(self, scheduler) -> None:
        self.steps: dict[str, list[tuple[int, int]]] = defaultdict(list)
        schedule = scheduler.schedule

        def logged_schedule(*args, **kwargs):
            output = schedule(*args, **kwargs)
            computed = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
            cached = output.scheduled_cached_reqs
            computed.update(zip(cached.req_ids, cached.num_computed_tokens))
            for req_id, count in output.num_scheduled_tokens.items():
                self.steps[req_id].append((computed[req_id], count))
            return output

        scheduler.schedule = logged_schedule  # observes; vLLM's method still does the work

    def internal_id(self, req_id: str) -> str:
        """vLLM's id of the request the caller named ``req_id`` (vLLM adds a suffix)."""
        (internal,) = (r for r in self.steps if r.rpartition("-")[0] == req_id)
        return internal

    def of(self, req_id: str) -> list[tuple[int, int]]:
        """The steps of the request the caller named ``req_id``."""
        return self.steps[self.internal_id(req_id)]

    def lives(self, req_id: str) -> list[list[tuple[int, int]]]:
        """The request's steps, split where it started again from token 0."""
        lives: list[list[tuple[int, int]]] = []
        for n, k in self.of(req_id):
            if n == 0:
                lives.append([])
            lives[-1].append((n, k))
        return lives
