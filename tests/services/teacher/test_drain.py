"""SIGTERM with requests in flight, on a real teacher process: the in-flight HTTP and gRPC
requests complete, /readyz says 503 "draining", gRPC health says NOT_SERVING, new requests get
503 / UNAVAILABLE, and the process then exits 0 inside the drain timeout.

The engine is the uniform engine made slow (2 s per engine call, slow_serve.py) so that the
requests are surely in flight when the signal lands; everything else is `opd serve`'s code."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opd_client import Sequence, TeacherClient
from opd_client.client import NO_RETRY
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc

SLOW_SERVE = Path(__file__).with_name("slow_serve.py")
DELAY_S, DRAIN_S = 2.0, 12


@pytest.fixture
def slow_teacher():
    env = {**os.environ, "OPD_HTTP_PORT": "0", "OPD_GRPC_PORT": "0", "OPD_LOG_LEVEL": "info",
           "OPD_DRAIN_TIMEOUT_S": str(DRAIN_S), "OPD_ENGINE": "uniform"}
    proc = subprocess.Popen([sys.executable, str(SLOW_SERVE), str(DELAY_S)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline, urls = time.monotonic() + 60, None
        while urls is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "slow_serve exited before listening"
            if "teacher listening" in line:
                urls = line.split("teacher listening: ")[1].split()[:2]
        assert urls, "the teacher did not announce its addresses"
        while httpx.get(f"{urls[0]}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the teacher did not become ready"
            time.sleep(0.1)
        yield proc, urls[0], urls[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _in_background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as e:  # noqa: BLE001 - asserted by the test
            out["error"] = e
        out["done_at"] = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _score(url: str):
    with TeacherClient(url, retry=NO_RETRY, timeout=30) as c:
        return c.score([Sequence(token_ids=[1, 2, 3, 4], id="in-flight")])


def test_sigterm_drains_in_flight_http_and_grpc_and_refuses_new_work(slow_teacher):
    proc, http_url, grpc_url = slow_teacher
    grpc_addr = grpc_url.removeprefix("grpc://")
    calls = [_in_background(lambda: _score(http_url)), _in_background(lambda: _score(grpc_url))]
    time.sleep(0.7)                                # both are inside the service (engine or batcher)
    assert all(th.is_alive() for th, _ in calls), "the requests finished before the signal: engine not slow"
    signalled_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    # while the two requests drain: not ready, new work refused with 503 / UNAVAILABLE
    deadline = time.monotonic() + DELAY_S
    while (r := httpx.get(f"{http_url}/readyz", timeout=2)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)                            # the signal handler has not run yet
    assert (r.status_code, r.json()) == (503, {"status": "draining"})
    r = httpx.post(f"{http_url}/v1/score", json={"sequences": [{"token_ids": [1, 2, 3]}]}, timeout=5)
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"], r.text
    assert r.headers["retry-after"] == "1"
    with grpc.insecure_channel(grpc_addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.TeacherStub(ch).Score(pb.ScoreRequest(sequences=[pb.Sequence(token_ids=[1, 2, 3])]), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert all(th.is_alive() for th, _ in calls), "the in-flight requests ended before the refusals were checked"

    # the in-flight requests complete with correct answers, then the process exits cleanly
    for th, out in calls:
        th.join(DRAIN_S + 5)
        assert "error" not in out, out.get("error")
        res = out["result"].results[0]
        assert res.id == "in-flight" and out["done_at"] > signalled_at
        np.testing.assert_allclose(res.logprobs_T, np.full(3, -np.log(64)), rtol=1e-6)
    assert proc.wait(DRAIN_S + 10) == 0
    assert time.monotonic() - signalled_at < DRAIN_S
    log = proc.stderr.read()
    assert "teacher stopped" in log and "drain timeout" not in log, log[-2000:]
