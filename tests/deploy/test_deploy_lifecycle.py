"""The teacher as the deployments run it: `opd serve` (the images' ENTRYPOINT + compose/k8s
command) in a subprocess with the compose file's teacher environment (host and ports moved to
free loopback ones, the tiny test model), probed the way Docker and Kubernetes probe it:
the Dockerfile's HEALTHCHECK command, /readyz and /healthz; then SIGTERM, which must end the
process well inside the k8s grace period. No container runtime is involved."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from opd_services.redis_embed import EmbeddedRedis

from deploy_helpers import (REPO, close_like_compose, compose, compose_url, compose_value, free_port,
                            render_raw_teacher_grace)

OPD = str(Path(sys.executable).parent / "opd")


def healthcheck_cmd(dockerfile: str) -> list[str]:
    m = re.search(r"^\s*CMD (\[.*\])\s*$", (REPO / "docker" / dockerfile).read_text().split("HEALTHCHECK", 1)[1], re.M)
    cmd = json.loads(m.group(1))
    return [sys.executable, *cmd[1:]] if cmd[0].startswith("python") else cmd


@pytest.fixture(scope="module")
def served(tiny_model, cache_dir, tmp_path_factory):
    svc = compose()["services"]["teacher"]
    env = {k: compose_value(v) for k, v in svc["environment"].items()}
    http, grpc = free_port(), free_port()
    redis_server = EmbeddedRedis().start()          # stands in for the compose `redis` service
    env.update(OPD_HOST="127.0.0.1", OPD_HTTP_PORT=str(http), OPD_GRPC_PORT=str(grpc),
               OPD_MODEL=str(tiny_model), OPD_CACHE_DIR=str(cache_dir),
               OPD_REDIS_URL=compose_url(env["OPD_REDIS_URL"], redis_server.port))
    close_like_compose(redis_server.url)            # as the compose file's redis command does
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([OPD, *svc["command"]], env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"opd serve not ready in 120 s:\n{log.read_text()}")
        yield proc, base, env, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        redis_server.stop()


def test_dockerfile_healthcheck_command_probes_the_teacher(served):
    _, base, _, _ = served
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        cmd = healthcheck_cmd(dockerfile)
        ok = subprocess.run(cmd, env={**os.environ, "HEALTHCHECK_URL": f"{base}/healthz"}, timeout=30)
        assert ok.returncode == 0, dockerfile
        down = subprocess.run(cmd, env={**os.environ, "HEALTHCHECK_URL": f"http://127.0.0.1:{free_port()}/healthz"},
                              capture_output=True, timeout=30)
        assert down.returncode != 0, f"{dockerfile}: HEALTHCHECK passes with nothing listening"


def test_probe_routes_answer(served):
    _, base, _, _ = served
    assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "alive"}
    assert httpx.get(f"{base}/readyz", timeout=5).json() == {"status": "ready"}
    assert "opd_ready 1.0" in httpx.get(f"{base}/metrics", timeout=5).text


def test_sigterm_exits_inside_the_grace_period(served):
    proc, _, env, log = served
    grace = render_raw_teacher_grace()
    assert grace > float(env["OPD_DRAIN_TIMEOUT_S"])
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"opd serve still running {grace} s after SIGTERM:\n{log.read_text()}")
    assert rc == 0, log.read_text()
    assert time.monotonic() - t0 < grace
