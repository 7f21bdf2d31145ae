"""`opd serve --engine vllm` stops its vLLM engine processes with it (SIGTERM -> drain -> engine down)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_engine_process_outlives_opd_serve(vllm_ok, vllm_model, tmp_path):
    port = _free_port()
    env = {**os.environ, "OPD_MODEL": str(vllm_model), "OPD_ENGINE": "vllm", "OPD_DTYPE": "float32",
           "OPD_HTTP_PORT": str(port), "OPD_GRPC_PORT": "0", "OPD_HOST": "127.0.0.1", "OPD_DRAIN_TIMEOUT_S": "2"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "opd_services.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("opd serve --engine vllm did not get ready in 180 s")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"sequences": [{"token_ids": [1, 2, 3]}]}, timeout=30)
        assert r.status_code == 200 and r.json()["model"]["engine"] == "vllm"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "vLLM runs its engine core in child processes; none found"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"engine processes left after opd serve stopped: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
