"""`opd scorer` as a user runs it: with no OPD_REDIS_URL it starts an embedded Valkey, scores,
serves /metrics, and on SIGTERM drains, stops that Valkey and exits 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import redis

from opd_client.queue import RolloutProducer
from opd_services.redis_embed import free_port
from queue_helpers import drain_scored, make_rollouts


@pytest.mark.slow
def test_opd_scorer_with_embedded_valkey_scores_then_stops_it(uniform_teacher):
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OPD_REDIS_URL"}
    env.update(OPD_TEACHER_URL=uniform_teacher.grpc_url, OPD_SCORER_METRICS_PORT=str(metrics_port),
               OPD_SCORER_DISCOVERY_S="0.2", OPD_LOG_LEVEL="info")
    p = subprocess.Popen([sys.executable, "-m", "opd_services.cli", "scorer"], env=env, stderr=subprocess.PIPE,
                         text=True)
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            m = re.search(r"embedded Valkey at (redis://\S+)", p.stderr.readline())
            url = m and m.group(1)
        assert url, "opd scorer did not report its embedded Valkey"
        threading.Thread(target=p.stderr.read, daemon=True).start()     # keep the pipe from filling
        with RolloutProducer(url, "cli") as q:
            q.push(make_rollouts(20))
        assert len(drain_scored(url, "cli", 20, timeout_s=20)) == 20
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'opd_queue_scored_total{experiment="cli"} 20.0' in body
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
    assert rc == 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
