"""`opd scorer`: the process around the scorer loops.

Owns: the Redis connection (or an embedded Valkey when OPD_REDIS_URL is unset), the teacher
client, `scorer_concurrency` loops on threads (each its own consumer, so one loop's Redis
I/O overlaps another's teacher call), the /metrics port, the queue gauges, and signals.

Shutdown, spelled out (SIGTERM or SIGINT):
  1) stop taking new batches;
  2) each loop finishes its batch if the teacher answers within drain_timeout_s, else
     releases it to other scorers; publishing stays atomic either way;
  3) close the teacher client and Redis; stop the embedded Valkey if we started one.
A second signal exits at once (pending entries are reclaimed by other scorers).
This module does not score or publish itself: see `worker`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from redis.exceptions import RedisError

from opd_client import RetryPolicy, TeacherClient
from opd_client.teachers import Teachers
from opd_client.queue import keys
from opd_client.queue.connection import connect
from opd_client.queue.consumer import default_consumer_name
from opd_services import metrics
from opd_services.config import Settings, check_tls
from opd_services.scorer.agreement import ReplicaCheck
from opd_services.scorer.worker import Experiments, ScorerLoop

log = logging.getLogger(__name__)


def update_gauges(redis, exps: list[str]) -> None:
    """Backlog (undelivered) and pending per experiment and stream, from XINFO GROUPS."""
    for exp in exps:
        for stream, key, group in (("rollouts", keys.rollouts_key(exp), keys.GROUP_SCORERS),
                                   ("scored", keys.scored_key(exp), keys.GROUP_TRAINERS)):
            groups = {keys.as_str(g["name"]): g for g in redis.xinfo_groups(key)} if redis.exists(key) else {}
            g = groups.get(group)
            lag = redis.xlen(key) if g is None or g.get("lag") is None else int(g["lag"])
            metrics.QUEUE_BACKLOG.labels(exp, stream).set(lag)
            metrics.QUEUE_PENDING.labels(exp, stream).set(0 if g is None else int(g["pending"]))


class Scorer:
    """Scorer loops + gauges for one process; `run(stop)` blocks until `stop` is set."""

    def __init__(self, settings: Settings, redis_url: str):
        s = settings
        check_tls(s)
        self.settings = s
        self.redis = connect(redis_url)
        # the scorer retries forever itself (worker.score); the client's own retries stay short
        # (3 tries: a failed replica's retry goes at once to another one)
        retry = RetryPolicy(attempts=3, backoff_s=0.05, max_backoff_s=0.2)
        named = s.teachers is not None        # with OPD_TEACHERS, each request names its teacher

        auth = {"tls": s.client_tls(), "api_key": s.teacher_api_key}

        def client(url: str, name: str) -> TeacherClient:
            return TeacherClient(url, timeout=s.scorer_teacher_timeout_s, retry=retry,
                                 teacher=name if named else None, **auth)
        self.teachers = Teachers(s.teacher_urls(), client)
        self.agreement = ReplicaCheck(s.teacher_urls(), s.replica_check_rate, named=named, client_kw=auth) \
            if s.replica_check_rate > 0 else None
        self.experiments = Experiments(self.redis, s.scorer_discovery_s)
        name = default_consumer_name("scorer")
        self.loops = [ScorerLoop(self.redis, self.teachers, f"{name}-{i}", Experiments(self.redis, s.scorer_discovery_s),
                                 batch_size=s.scorer_batch_size, block_ms=s.scorer_block_ms,
                                 reclaim_idle_s=s.queue_reclaim_idle_s, backoff_max_s=s.scorer_backoff_max_s,
                                 drain_timeout_s=s.drain_timeout_s, check=self.agreement and self.agreement.offer)
                      for i in range(s.scorer_concurrency)]

    def _gauges(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.scorer_gauges_s):
            try:
                update_gauges(self.redis, self.experiments.current())
            except RedisError as e:
                log.debug("gauges skipped: %s", e)

    def run(self, stop: threading.Event) -> None:
        threads = [threading.Thread(target=loop.run, args=(stop,), name=loop.consumer, daemon=True)
                   for loop in self.loops]
        threads.append(threading.Thread(target=self._gauges, args=(stop,), name="scorer-gauges", daemon=True))
        if self.agreement is not None:
            threads.append(threading.Thread(target=self.agreement.run, args=(stop,), name="replica-check", daemon=True))
        for t in threads:
            t.start()
        log.info("scorer up: %d loop(s), batch %d, teachers %s", len(self.loops), self.settings.scorer_batch_size,
                 self.teachers.urls)
        stop.wait()
        for t in threads:
            t.join(self.settings.drain_timeout_s + 5)
        self.teachers.close()
        if self.agreement is not None:
            self.agreement.close()
        self.redis.close()


def serve_scorer(settings: Settings) -> int:
    """The `opd scorer` command: run until SIGTERM/SIGINT; a second signal exits at once."""
    from prometheus_client import start_http_server
    embedded = None
    url = settings.redis_url
    if url is None:
        from opd_services.redis_embed import EmbeddedRedis
        embedded = EmbeddedRedis().start()       # in-memory: it lives and dies with this process
        url = embedded.url
        log.warning("OPD_REDIS_URL unset: started an embedded Valkey at %s (producers and trainers: "
                    "OPD_REDIS_URL=%s); it stops with this process", url, url)
    stop = threading.Event()

    def on_signal(sig, _frame):
        if stop.is_set():
            log.warning("second %s: exiting without draining", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s: draining (up to %.0fs)", signal.Signals(sig).name, settings.drain_timeout_s)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        if settings.scorer_metrics_port:
            start_http_server(settings.scorer_metrics_port, addr=settings.host)
            log.info("scorer metrics on http://%s:%d/metrics", settings.host, settings.scorer_metrics_port)
        Scorer(settings, url).run(stop)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
