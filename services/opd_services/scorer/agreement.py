"""Replica agreement: score a sample of real traffic on every replica of its teacher; compare.

The scorer offers every answered request (`offer(teacher, seqs, resp)`); each sequence is
kept with probability `rate` (default 1 in 1,000) in a small bounded queue (when it is full
the sample is dropped: the check never slows scoring). A thread (`run`) takes samples,
scores them on each replica of the teacher separately (one single-address client each,
no failover) and, for every pair of replicas that answered, sets
  opd_teacher_replica_max_abs_diff{teacher, pair="A|B"}    largest |logprob_A - logprob_B|
  opd_teacher_replica_identity_mismatch{teacher, pair}      1 when revision or dtype differ
A DNS target (grpc+dns://, http+dns://) is resolved here, at each check, to find the replicas.
The alert (monitoring/rules) fires above 1e-3. This module never changes a published
result and does not read the queue (`opd fleet check` feeds it rollouts itself).
"""
from __future__ import annotations

import logging
import queue
import random
import socket
import threading
from dataclasses import dataclass

import numpy as np

from opd_client import NO_RETRY, OPDError, Sequence, TeacherClient
from opd_client.targets import parse_target, resolve
from opd_services import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairResult:
    teacher: str
    pair: str                  # "A|B", the two replica addresses
    max_abs_diff: float
    identity_mismatch: bool
    detail: str                # what differs in the identity, if anything


def replica_urls(url: str) -> list[str]:
    """One single-replica URL per replica of the target `url` (DNS names resolved now)."""
    t = parse_target(url)
    if t.transport == "http":
        return resolve(t.addresses[0]) if t.dns else list(t.addresses)
    if not t.dns:
        return [f"grpc://{a}" for a in t.addresses]
    host, _, port = t.addresses[0].removeprefix("dns:///").rpartition(":")
    try:
        ips = sorted({i[4][0] for i in socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)})
    except OSError:
        return []
    return [f"grpc://{f'[{ip}]' if ':' in ip else ip}:{port}" for ip in ips]


class ReplicaCheck:
    def __init__(self, teacher_urls: dict[str, str], rate: float, *, named: bool = True,
                 timeout_s: float = 30.0, max_sequences: int = 16, client_kw: dict | None = None):
        self.urls, self.rate, self.named, self.timeout_s = dict(teacher_urls), rate, named, timeout_s
        self.client_kw = client_kw or {}      # TLS and API key, as the scorer's own clients have them
        self.max_sequences = max_sequences
        self._samples: queue.Queue = queue.Queue(maxsize=64)
        self._clients: dict[tuple[str, str], TeacherClient] = {}
        self._pairs: dict[str, set[str]] = {}

    # ---- on the scoring path: cheap, never blocks ----------------------------------------

    def offer(self, teacher: str, seqs: list[Sequence], _resp=None) -> None:
        n = np.random.binomial(len(seqs), self.rate) if self.rate < 1 else len(seqs)
        if n:
            try:
                self._samples.put_nowait((teacher, random.sample(seqs, min(n, self.max_sequences))))
            except queue.Full:
                pass            # a check is still running: this sample is not needed

    # ---- on its own thread ---------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                teacher, seqs = self._samples.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.check(teacher, seqs)
            except Exception:  # the check must never take the scorer down; say so and go on
                log.exception("replica agreement check of %r failed", teacher)

    def _client(self, teacher: str, url: str) -> TeacherClient:
        key = (teacher, url)
        if key not in self._clients:
            self._clients[key] = TeacherClient(url, timeout=self.timeout_s, retry=NO_RETRY,
                                               teacher=teacher if self.named else None, **self.client_kw)
        return self._clients[key]

    def check(self, teacher: str, seqs: list[Sequence]) -> list[PairResult]:
        """Score `seqs` on every replica of `teacher`, export and return one result per pair."""
        urls = replica_urls(self.urls[teacher])
        if len(urls) < 2:
            return []               # one replica: nothing to compare it with
        answers = {}
        for url in urls:
            try:
                answers[url.split("://", 1)[1]] = self._client(teacher, url).score(seqs)
            except OPDError as e:
                log.info("replica check: %s of %r did not answer (%s); left out this time", url, teacher, e)
        names = sorted(answers)
        out = [_compare(teacher, a, b, answers[a], answers[b]) for i, a in enumerate(names) for b in names[i + 1:]]
        for r in out:
            metrics.REPLICA_MAX_ABS_DIFF.labels(r.teacher, r.pair).set(r.max_abs_diff)
            metrics.REPLICA_IDENTITY_MISMATCH.labels(r.teacher, r.pair).set(int(r.identity_mismatch))
            if r.identity_mismatch or r.max_abs_diff > 1e-3:
                log.warning("replicas of %r disagree: %s max |diff| %.3g %s", teacher, r.pair, r.max_abs_diff, r.detail)
        self._forget_gone(teacher, {r.pair for r in out}, len(names))
        return out

    def _forget_gone(self, teacher: str, pairs: set[str], answered: int) -> None:
        """Drop the series of pairs whose replicas are gone (rescheduled pods), so labels stay few."""
        if answered < 2:
            return
        for pair in self._pairs.get(teacher, set()) - pairs:
            for g in (metrics.REPLICA_MAX_ABS_DIFF, metrics.REPLICA_IDENTITY_MISMATCH):
                try:
                    g.remove(teacher, pair)
                except KeyError:
                    pass
        self._pairs[teacher] = pairs

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


def _compare(teacher: str, a: str, b: str, ra, rb) -> PairResult:
    diff = 0.0
    for x, y in zip(ra.results, rb.results):
        if x.logprobs_T.shape != y.logprobs_T.shape:
            diff = float("inf")
            break
        if x.logprobs_T.size:
            diff = max(diff, float(np.max(np.abs(x.logprobs_T.astype(np.float64) - y.logprobs_T))))
    ma, mb = ra.model, rb.model
    what = [f"{k} {getattr(ma, k)!r} != {getattr(mb, k)!r}" for k in ("revision", "dtype", "name", "teacher")
            if getattr(ma, k) != getattr(mb, k)]
    return PairResult(teacher, f"{a}|{b}", diff, bool(what), "; ".join(what))
