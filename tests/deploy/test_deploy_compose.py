"""docker-compose.yml: accepted by `docker-compose config -q` with every profile (Debian's
docker-compose; test_deploy_compose_run.py runs the default profile from the image), and the stack
has what the deployment promises: Redis with AOF on a volume, the demo trainer and the vLLM
teacher behind their profiles, Prometheus and Grafana wired to monitoring/."""
from __future__ import annotations

import itertools
import os
import subprocess

import pytest

from deploy_helpers import COMPOSE, COMPOSE_ENV, REPO, compose, require_tool, run

PROFILES = ("demo", "gpu", "fleet", "multi-teacher", "tls")
COMBOS = [c for n in range(len(PROFILES) + 1) for c in itertools.combinations(PROFILES, n)]


@pytest.mark.parametrize("profiles", COMBOS, ids=lambda c: "+".join(c) or "default")
def test_compose_config_accepts_every_profile(profiles):
    dc = require_tool("docker-compose")
    args = [a for p in profiles for a in ("--profile", p)]
    proc = run([dc, "-f", str(COMPOSE), *args, "config", "-q"], env=COMPOSE_ENV)
    assert proc.returncode == 0, proc.stderr
    # (docker-compose 1.29 lists every service whatever the profiles; which service sits in
    # which profile is checked on the file itself below)


def test_compose_config_rejects_a_broken_file(tmp_path):
    dc = require_tool("docker-compose")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period: 30s", "stop_grace_periodd: 30s", 1))
    proc = run([dc, "-f", str(bad), "config", "-q"], env=COMPOSE_ENV)
    assert proc.returncode != 0 and "stop_grace_periodd" in proc.stderr


def test_compose_refuses_to_start_without_the_redis_password():
    dc = require_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    proc = subprocess.run([dc, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode != 0 and "OPD_REDIS_ADMIN_PASSWORD" in proc.stderr


def test_redis_keeps_an_append_only_file_on_a_volume():
    redis = compose()["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--user default off" in cmd
    assert any(v.endswith(":/data") and not v.startswith(".") for v in redis["volumes"])


def test_profiles_and_gpu_reservation():
    svcs = compose()["services"]
    assert svcs["trainer"]["profiles"] == ["demo"] and svcs["trainer"]["command"][0] == "train"
    assert svcs["scorer"]["command"] == ["scorer"] and "profiles" not in svcs["scorer"]
    vllm = svcs["teacher-vllm"]
    assert vllm["profiles"] == ["gpu"] and vllm["environment"]["OPD_ENGINE"] == "vllm"
    (dev,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert svcs["teacher"]["environment"]["OPD_HOST"] == "0.0.0.0"
    assert svcs["teacher-2"]["profiles"] == ["fleet"] and svcs["teacher-2"]["environment"] == svcs["teacher"]["environment"]
    code = svcs["teacher-code"]
    assert code["profiles"] == ["multi-teacher"] and code["environment"]["OPD_TEACHER_NAME"] == "code"
    assert not svcs["teacher-2"]["ports"] and not code["ports"]      # the host ports stay the first teacher's


def test_mounted_files_and_dockerfiles_exist():
    for svc in compose()["services"].values():
        for v in svc.get("volumes", []):
            if v.startswith("./"):
                assert (REPO / v.split(":")[0]).exists(), v
        build = svc.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()
