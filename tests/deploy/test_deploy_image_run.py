"""docker/Dockerfile.cpu, built (podman, only build arguments changed) and run from the image:
`opd serve` scores over HTTP and gRPC, `opd scorer` scores queued rollouts, `opd train --help`
runs, the HEALTHCHECK command passes against a live process and fails against a dead one, and
a bad OPD_* value stops a process at start naming the variable. Every program runs as the
image's user (uid 10001) on a read-only view of the image, writable only where the k8s
manifests mount volumes (see image_helpers for how, without `podman run`)."""
from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from deploy_helpers import free_port, k8s_writable_paths
from image_helpers import Image, ImageProcess, run_in_image, volume_dir, wait_http
from opd_services.redis_embed import EmbeddedRedis


def volumes_for(image: Image, workload: str, tmp) -> dict:
    return {p: volume_dir(tmp / p.strip("/").replace("/", "-"), image, sticky=p == "/tmp")
            for p in k8s_writable_paths(workload)}


@pytest.fixture(scope="module")
def served(opd_image, tmp_path_factory):
    """`opd serve` from the image (its ENTRYPOINT + CMD), ports moved off the defaults."""
    tmp = tmp_path_factory.mktemp("image-teacher")
    http, grpc = free_port(), free_port()
    vols = volumes_for(opd_image, "opd-teacher", tmp)
    proc = ImageProcess(opd_image, opd_image.entrypoint + opd_image.cmd, log=tmp / "serve.log", volumes=vols,
                        env={"OPD_HTTP_PORT": str(http), "OPD_GRPC_PORT": str(grpc)})
    try:
        wait_http(f"http://127.0.0.1:{http}/readyz", proc=proc, timeout=300)
        yield {"http": http, "grpc": grpc, "proc": proc, "volumes": vols}
    finally:
        assert proc.stop() == 0, proc.text()[-3000:]       # SIGTERM: drains and exits cleanly


def test_image_is_the_cpu_image(opd_image):
    assert opd_image.user == "10001:10001" and opd_image.entrypoint == ["opd"] and opd_image.cmd == ["serve"]
    assert opd_image.healthcheck, "the image has no HEALTHCHECK (built in OCI format?)"
    torch = run_in_image(opd_image, ["python", "-c", "import torch; print(torch.__version__)"], env={}, volumes={})
    assert torch.returncode == 0 and torch.stdout.strip().endswith("+cpu"), torch.stdout + torch.stderr


def test_serve_scores_over_http_and_grpc(served):
    from opd_client import Sequence, TeacherClient
    body = {"top_k": 3, "sequences": [{"id": "a", "token_ids": [1, 5, 7, 9, 11], "score_from": 2}]}
    r = httpx.post(f"http://127.0.0.1:{served['http']}/v1/score", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert len(res["logprobs"]) == 3 and len(res["top_ids"][0]) == 3 and r.json()["model"]["engine"] == "torch"
    with TeacherClient(f"grpc://127.0.0.1:{served['grpc']}") as client:
        out = client.score([Sequence(token_ids=[1, 5, 7, 9, 11], score_from=2)], top_k=0)
    assert np.allclose(out.results[0].logprobs_T, res["logprobs"], atol=1e-5)


def test_only_the_volumes_are_writable(opd_image, served, tmp_path):
    # the teacher built its default model where the manifests mount the cache volume
    assert any(served["volumes"]["/var/cache/opd"].rglob("*.safetensors"))
    probe = "import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p + '/w', 'w').close(); print(p, 'ok')\n" \
            "    except OSError as e:\n        print(p, e.errno)"
    vols = volumes_for(opd_image, "opd-teacher", tmp_path)
    out = run_in_image(opd_image, ["python", "-c", probe, "/tmp", "/var/cache/opd", "/home/opd", "/opt/venv"],
                       env={}, volumes=vols)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["/tmp ok", "/var/cache/opd ok", "/home/opd 30", "/opt/venv 30"], out.stdout
    uid = run_in_image(opd_image, ["id", "-u"], env={}, volumes={})
    assert uid.stdout.strip() == "10001"


def test_healthcheck_command(opd_image, served):
    live = run_in_image(opd_image, opd_image.healthcheck, volumes={},
                        env={"HEALTHCHECK_URL": f"http://127.0.0.1:{served['http']}/readyz"})
    assert live.returncode == 0, live.stderr
    dead = run_in_image(opd_image, opd_image.healthcheck, volumes={},
                        env={"HEALTHCHECK_URL": f"http://127.0.0.1:{free_port()}/healthz"})
    assert dead.returncode != 0 and "Connection refused" in dead.stderr


def test_scorer_scores_queued_rollouts(opd_image, served, tmp_path):
    from opd_client.queue import Rollout, RolloutProducer
    metrics = free_port()
    with EmbeddedRedis() as redis:
        env = {"OPD_REDIS_URL": redis.url, "OPD_TEACHER_URL": f"grpc://127.0.0.1:{served['grpc']}",
               "OPD_SCORER_METRICS_PORT": str(metrics), "HEALTHCHECK_URL": f"http://127.0.0.1:{metrics}/metrics"}
        scorer = ImageProcess(opd_image, ["opd", "scorer"], log=tmp_path / "scorer.log", env=env,
                              volumes=volumes_for(opd_image, "opd-scorer", tmp_path))
        try:
            wait_http(f"http://127.0.0.1:{metrics}/metrics", proc=scorer, timeout=120)
            with RolloutProducer(redis.url, "img") as q:
                q.push([Rollout(id=f"r{i}", token_ids=np.array([1, 2, 3, 4 + i], np.int32), score_from=2)
                        for i in range(3)])
            got = _read_scored(redis.url, "img", 3)
            assert sorted(s.rollout.id for s in got) == ["r0", "r1", "r2"]
            assert all(len(s.teacher_logprobs) == 2 for s in got)
            health = run_in_image(opd_image, opd_image.healthcheck, env=env, volumes={})
            assert health.returncode == 0, health.stderr
        finally:
            assert scorer.stop() == 0, scorer.text()[-3000:]


def _read_scored(url: str, exp: str, n: int, timeout: float = 60) -> list:
    from opd_client.queue import ScoredConsumer
    got, deadline = [], time.monotonic() + timeout
    with ScoredConsumer(url, exp) as c:
        while len(got) < n and time.monotonic() < deadline:
            batch = c.read(count=n, block_ms=500)
            got += [s for _, s in batch]
            c.ack([eid for eid, _ in batch])
    return got


def test_train_help(opd_image):
    out = run_in_image(opd_image, ["opd", "train", "--help"], env={}, volumes={})
    assert out.returncode == 0 and "usage: opd train" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("argv,name,value", [
    (["opd", "serve"], "OPD_HTTP_PORT", "eighty"),
    (["opd", "serve"], "OPD_ENGINE", "tensorflow"),
    (["opd", "scorer"], "OPD_SCORER_CONCURRENCY", "0"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("OPD_") else "")
def test_bad_env_value_stops_the_process_naming_it(opd_image, tmp_path, argv, name, value):
    t0 = time.monotonic()
    out = run_in_image(opd_image, argv, env={name: value, "OPD_REDIS_URL": "redis://127.0.0.1:1/0"},
                       volumes=volumes_for(opd_image, "opd-teacher", tmp_path), timeout=120)
    assert out.returncode != 0
    assert name in out.stderr and value in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, "a configuration error should be a message, not a stack trace"
    assert time.monotonic() - t0 < 60
