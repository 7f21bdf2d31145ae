"""Isolation, authentication, key rotation and deletion, through HTTP, gRPC and Redis ACLs."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
import redis

from opd_client import TeacherClient, Unauthenticated
from opd_client.queue import RolloutProducer
from opd_client.types import Rollout
from opd_services.tenancy.registry import EXPERIMENTS, acl_user

from tenancy_helpers import ADMIN_KEY


def name() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


SCORE = {"sequences": [{"token_ids": [1, 2, 3]}]}


def test_open_until_the_first_experiment_then_keys_required(tenant_teacher, registry):
    registry.redis.delete(EXPERIMENTS)
    url = tenant_teacher.http_url
    assert httpx.post(f"{url}/v1/score", json=SCORE).status_code == 200      # auto: no experiments yet
    creds = registry.create(name())
    r = httpx.post(f"{url}/v1/score", json=SCORE)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/score", json=SCORE, headers=auth(creds.api_key)).status_code == 200


@pytest.fixture
def two(registry):
    a, b = name(), name()
    return registry.create(a), registry.create(b)


def test_every_route_and_rpc_needs_a_key(tenant_teacher, two):
    url = tenant_teacher.http_url
    routes = [("POST", "/v1/score", SCORE), ("GET", "/v1/model", None), ("GET", "/v1/admin/experiments", None),
              ("GET", f"/v1/experiments/{two[0].experiment}/usage", None)]
    for method, path, body in routes:
        for headers in ({}, auth("opd_not-a-real-key"), {"authorization": "Basic abc"}):
            r = httpx.request(method, f"{url}{path}", json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
    for path in ("/healthz", "/readyz", "/metrics"):                      # probes and Prometheus stay open
        assert httpx.get(f"{url}{path}").status_code == 200
    for key in (None, "opd_not-a-real-key"):
        with TeacherClient(tenant_teacher.grpc_url, api_key=key) as c:
            with pytest.raises(Unauthenticated):
                c.score([[1, 2, 3]])
            with pytest.raises(Unauthenticated):
                c.model()


DIALECTS = [  # route, body, the error body's shape
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 1}, {"message", "type", "param", "code"}),
    ("/inference/v1/generate", {"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 1, "prompt_logprobs": 1}},
     {"message", "type", "param", "code"}),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                   "logprob_start_len": 0}, {"message"}),
]


@pytest.mark.parametrize("path,body,shape", DIALECTS, ids=[d[0] for d in DIALECTS])
def test_dialect_routes_need_a_key_and_answer_in_their_shape(tenant_teacher, two, path, body, shape):
    url = tenant_teacher.http_url
    for headers in ({}, auth("opd_not-a-real-key")):
        r = httpx.post(f"{url}{path}", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert set(r.json()["error"]) == shape
    assert httpx.post(f"{url}{path}", json=body, headers=auth(two[0].api_key)).status_code == 200


def test_experiment_key_scores_as_itself_and_cannot_manage_or_read_others(tenant_teacher, two, registry):
    a, b = two
    url = tenant_teacher.http_url
    for t in (tenant_teacher.http_url, tenant_teacher.grpc_url):
        with TeacherClient(t, api_key=a.api_key) as c:
            assert c.score([[1, 2, 3, 4]]).usage.scored_tokens == 3
    metrics = httpx.get(f"{url}/metrics").text
    assert f'opd_scored_tokens_total{{experiment="{a.experiment}"}} 6.0' in metrics
    assert httpx.get(f"{url}/v1/experiments/{a.experiment}/usage", headers=auth(a.api_key)).status_code == 200
    r = httpx.get(f"{url}/v1/experiments/{b.experiment}/usage", headers=auth(a.api_key))
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    for method, path in (("GET", "/v1/admin/experiments"), ("POST", "/v1/admin/experiments"),
                         ("DELETE", f"/v1/admin/experiments/{b.experiment}"),
                         ("POST", f"/v1/admin/experiments/{b.experiment}/rotate-key")):
        r = httpx.request(method, f"{url}{path}", headers=auth(a.api_key), json={"name": "x"})
        assert r.status_code == 403, (path, r.text)
    assert registry.get(b.experiment) is not None
    deadline = time.monotonic() + 5                     # usage reaches Redis within a flush period
    while registry.usage(a.experiment)["scored_tokens"] < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    used = registry.usage(a.experiment)
    assert used["scored_tokens"] == 6 and used["requests"] == 2 and used["teacher_ms"] > 0


def test_admin_manages_experiments_over_http(tenant_teacher, registry):
    url, n = tenant_teacher.http_url, name()
    admin = auth(ADMIN_KEY)
    r = httpx.post(f"{url}/v1/admin/experiments", headers=admin, json={"name": n, "weight": 2, "max_inflight_tokens": 500})
    assert r.status_code == 201
    key = r.json()["api_key"]
    assert httpx.post(f"{url}/v1/score", json=SCORE, headers=auth(key)).status_code == 200
    shown = httpx.get(f"{url}/v1/admin/experiments/{n}", headers=admin).json()
    assert shown["weight"] == 2 and "key_hash" not in shown and shown["redis_user"] == acl_user(n)
    r = httpx.patch(f"{url}/v1/admin/experiments/{n}", headers=admin, json={"weight": 0})
    assert r.status_code == 422 and r.json()["error"]["field"] == "weight"
    for bad in ({"weight": True}, {"max_inflight_tokens": False}, {"max_backlog": True}, {"max_backlog": 2.5}):
        r = httpx.patch(f"{url}/v1/admin/experiments/{n}", headers=admin, json=bad)     # not a number / integer
        assert r.status_code == 422 and r.json()["error"]["field"] == next(iter(bad)), (bad, r.text)
    assert httpx.post(f"{url}/v1/admin/experiments", headers=admin, json={"name": name(), "weight": True}).status_code == 422
    assert shown["teacher"] is None                                  # the scorers' default teacher
    r = httpx.patch(f"{url}/v1/admin/experiments/{n}", headers=admin, json={"teacher": "math"})
    assert r.status_code == 200 and r.json()["teacher"] == "math"
    r = httpx.patch(f"{url}/v1/admin/experiments/{n}", headers=admin, json={"teacher": "Math!"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "teacher"
    r = httpx.post(f"{url}/v1/admin/experiments", headers=admin, json={"name": "bad name{x}"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "experiment"
    assert httpx.delete(f"{url}/v1/admin/experiments/{n}", headers=admin).status_code == 200
    assert httpx.post(f"{url}/v1/score", json=SCORE, headers=auth(key)).status_code == 401


def test_rotation_and_deletion_take_effect_on_the_next_request(tenant_teacher, registry):
    n = name()
    old = registry.create(n).api_key
    with TeacherClient(tenant_teacher.grpc_url, api_key=old) as c:
        c.score([[1, 2]])
    new = registry.rotate_key(n).api_key
    with TeacherClient(tenant_teacher.grpc_url, api_key=old) as c:
        with pytest.raises(Unauthenticated):
            c.score([[1, 2]])
    with TeacherClient(tenant_teacher.grpc_url, api_key=new) as c:
        c.score([[1, 2]])
        registry.delete(n)
        with pytest.raises(Unauthenticated):
            c.score([[1, 2]])


def test_redis_acl_confines_an_experiment_to_its_own_keys(redis_server, registry, two):
    a, b = two
    host = redis_server.url.removeprefix("redis://")
    a_url = f"redis://{a.redis_user}:{a.redis_password}@{host}"
    with RolloutProducer(a_url, a.experiment) as q:                       # the real producer works under ACL
        q.push([Rollout(id="r1", token_ids=np.array([1, 2, 3], np.int32), score_from=1)])
    r = redis.Redis.from_url(a_url)
    for cmd in (("XADD", f"opd:{{{b.experiment}}}:rollouts", "*", "d", "x"),
                ("XRANGE", f"opd:{{{b.experiment}}}:scored", "-", "+"),
                ("HGETALL", EXPERIMENTS), ("KEYS", "*"), ("FLUSHALL",),
                ("ACL", "SETUSER", "evil", "on", "+@all"), ("SET", f"opd:{{{a.experiment}}}:x", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command(*cmd)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(f"redis://{a.redis_user}:wrong@{host}").ping()
    registry.delete(a.experiment)
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError)):
        redis.Redis.from_url(a_url).ping()


def test_cli_manages_experiments(redis_server):
    n = name()

    def opd(*args):
        return subprocess.run([sys.executable, "-m", "opd_services.cli", "experiments", "--redis-url",
                               redis_server.url, "--json", *args], capture_output=True, text=True, timeout=60)
    created = opd("create", n, "--weight", "3", "--max-inflight-tokens", "1000")
    assert created.returncode == 0, created.stderr
    assert '"api_key": "opd_' in created.stdout
    listed = opd("list")
    assert n in listed.stdout
    shown = opd("show", n)
    assert '"weight": 3.0' in shown.stdout and '"scored_tokens"' in shown.stdout and "key_hash" not in shown.stdout
    bad = opd("update", n, "--weight", "-1")
    assert bad.returncode == 1 and "weight" in bad.stderr
    routed = opd("update", n, "--teacher", "code")
    assert routed.returncode == 0 and '"teacher": "code"' in routed.stdout
    assert opd("delete", n).returncode == 0
    missing = opd("show", n)
    assert missing.returncode == 1 and "no experiment named" in missing.stderr


def test_acl_users_come_back_after_a_redis_restart(cache_dir):
    """ACL users live in Redis memory; the teacher recreates them from the (persisted) registry."""
    from opd_client.queue.connection import connect
    from opd_services.redis_embed import EmbeddedRedis
    from opd_services.teacher.server import BackgroundTeacher
    from opd_services.tenancy.registry import Registry

    from tenancy_helpers import PacedEngine, tenancy_settings
    with EmbeddedRedis(appendonly=True) as server:
        creds = Registry(connect(server.url)).create(name())
        host = server.url.removeprefix("redis://")
        as_exp = f"redis://{creds.redis_user}:{creds.redis_password}@{host}"
        s = tenancy_settings(cache_dir, server.url, acl_sync_s=0.2)
        with BackgroundTeacher(s, engine=lambda: PacedEngine(0.0)):
            assert redis.Redis.from_url(as_exp).ping()
            server.restart()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert redis.Redis.from_url(as_exp).ping()
                    break
                except (redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError):
                    assert time.monotonic() < deadline, "ACL user not recreated"
                    time.sleep(0.1)


def test_records_stay_readable_across_releases():
    """A record without a default teacher is written as before (older readers take it), and a
    record from a newer release with fields this one does not know still reads."""
    import json

    from opd_services.tenancy.registry import Experiment
    assert "teacher" not in json.loads(Experiment("a").to_json())
    assert json.loads(Experiment("a", teacher="math").to_json())["teacher"] == "math"
    newer = json.dumps({**json.loads(Experiment("b").to_json()), "some_future_field": 1})
    assert Experiment.from_json(newer).name == "b"

