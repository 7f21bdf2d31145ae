"""Weighted fair queuing on tokens across experiments, at the scorer's batch granularity.

Each experiment has a virtual time; serving a batch of N tokens advances it by N / weight.
The scorer visits experiments in order of virtual time, so over a busy period each one's
share of scored tokens follows its weight (the teacher's batcher applies the same rule to
what reaches it). An experiment that was idle re-enters at the current virtual clock: no
credit is hoarded while idle. Weights come from the experiments registry; unregistered
experiments weigh 1. This module does no I/O.
"""
from __future__ import annotations


class FairShare:
    def __init__(self) -> None:
        self.vtime: dict[str, float] = {}
        self.clock = 0.0

    def _start(self, exp: str) -> float:
        return max(self.vtime.get(exp, 0.0), self.clock)

    def order(self, experiments: list[str]) -> list[str]:
        """The experiments to visit, the most owed first."""
        return sorted(experiments, key=lambda e: (self._start(e), e))

    def charge(self, exp: str, tokens: int, weight: float) -> None:
        start = self._start(exp)
        self.clock = start
        self.vtime[exp] = start + max(tokens, 1) / weight
