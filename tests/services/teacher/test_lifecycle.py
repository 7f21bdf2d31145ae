"""Start-up, readiness, graceful drain and shutdown of the teacher, in-process and as `opd serve`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from opd_client import Sequence, TeacherClient
from opd_services.config import Settings
from opd_services.errors import ConfigError
from opd_services.teacher.engines.base import ItemScores
from opd_services.teacher.server import BackgroundTeacher
from opd_services.teacher.engines.uniform_engine import UniformEngine


class SlowEngine(UniformEngine):
    """The uniform engine, slowed down, so a request is surely in flight during shutdown."""

    def __init__(self, delay: float):
        super().__init__(vocab_size=64, max_model_len=128)
        self.delay = delay

    def score(self, items) -> list[ItemScores]:
        time.sleep(self.delay)
        return super().score(items)


def test_shutdown_drains_in_flight_requests(settings):
    t = BackgroundTeacher(settings, engine=lambda: SlowEngine(1.5)).start()
    results, errors = [], []

    def call():
        try:
            with TeacherClient(t.grpc_url) as c:
                results.append(c.score([Sequence(token_ids=[1, 2, 3])]))
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            errors.append(e)

    th = threading.Thread(target=call)
    th.start()
    time.sleep(0.5)                       # the request is now inside the engine
    t0 = time.monotonic()
    t.stop()
    th.join(10)
    assert not errors and len(results) == 1, errors
    np.testing.assert_allclose(results[0].results[0].logprobs_T, -np.log(64), rtol=1e-6)
    assert time.monotonic() - t0 < settings.drain_timeout_s + 3


def test_not_ready_while_loading_then_ready(settings):
    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        return UniformEngine(vocab_size=64, max_model_len=128)

    t = BackgroundTeacher(settings, engine=slow_load)
    t._thread.start()
    import asyncio
    asyncio.run_coroutine_threadsafe(t.server.start(wait_ready=False), t._loop).result()
    try:
        assert httpx.get(f"{t.http_url}/healthz").status_code == 200
        r = httpx.get(f"{t.http_url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{t.http_url}/v1/score", json={"sequences": [{"token_ids": [1, 2]}]})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        for _ in range(50):
            if httpx.get(f"{t.http_url}/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert httpx.get(f"{t.http_url}/readyz").status_code == 200
    finally:
        gate.set()
        t.stop()


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("OPD_HTTP_PORT", "eighty")
    with pytest.raises(ConfigError) as e:
        Settings.load()
    assert "OPD_HTTP_PORT='eighty'" in str(e.value)
    monkeypatch.delenv("OPD_HTTP_PORT")
    with pytest.raises(ConfigError, match="OPD_MAX_TOP_K"):
        Settings.load(max_top_k=-1)


def test_missing_model_dir_fails_at_start_up(tmp_path):
    r = subprocess.run([sys.executable, "-m", "opd_services.cli", "serve", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "OPD_MODEL" in r.stderr and "config.json" in r.stderr


def test_opd_serve_stops_cleanly_on_sigterm(tiny_model, tmp_path):
    env = {**os.environ, "OPD_MODEL": str(tiny_model), "OPD_HTTP_PORT": "0", "OPD_GRPC_PORT": "0",
           "OPD_LOG_LEVEL": "info", "OPD_DRAIN_TIMEOUT_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "opd_services.cli", "serve"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "teacher listening" in line:
                url = line.split("teacher listening: ")[1].split()[0]
        assert url, "server did not announce its address"
        for _ in range(100):
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert httpx.post(f"{url}/v1/score", json={"sequences": [{"token_ids": [1, 2, 3]}]}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "teacher stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
