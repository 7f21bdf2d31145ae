"""Ports, env var names and paths in docker-compose.yml, k8s/ and the Dockerfiles match the
services' Settings (services/opd_services/config.py): every OPD_* name is a Settings field,
every value is one Settings accepts, ports agree with the defaults and with each other.
Reads files only (k8s/ as written, plus the rendered overlays where kubectl is available)."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import yaml

from deploy_helpers import (OVERLAYS, REPO, compose, compose_value, containers, env_of, find, raw_k8s_docs,
                            render)
from opd_services.config import Settings
from opd_services.teacher.server import HTTP_ROUTES as ROUTES

# Settings fields that the scorer and trainer issues add (names agreed with them). Until their
# branches land, these names are checked against this table instead of Settings; once a field
# exists in Settings it is checked there, and its default must equal the one here.
PENDING = {"scorer_metrics_port": 9100, "trainer_metrics_port": 9101}
FIELDS = Settings.model_fields


def field_default(name: str):
    return FIELDS[name].default if name in FIELDS else PENDING[name]


def field_of(env_name: str) -> str:
    assert env_name.startswith("OPD_")
    return env_name[4:].lower()


def compose_envs() -> dict[str, dict[str, str]]:
    return {name: {k: compose_value(v) for k, v in (svc.get("environment") or {}).items()}
            for name, svc in compose()["services"].items()}


def k8s_envs() -> list[tuple[str, dict]]:
    return [(f"{wl}/{c['name']}", env_of(c)) for wl, _, c in containers(raw_k8s_docs())]


def dockerfile_envs() -> dict[str, set[str]]:
    out = {}
    for path in (REPO / "docker").glob("Dockerfile.*"):
        out[path.name] = set(re.findall(r"\b(OPD_[A-Z0-9_]+)=", path.read_text()))
    return out


def all_env_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for where, env in [(f"compose:{s}", e) for s, e in compose_envs().items()] + \
                      [(f"k8s:{w}", e) for w, e in k8s_envs()] + list(dockerfile_envs().items()):
        for n in env:
            if n.startswith("OPD_"):
                names.setdefault(n, set()).add(where)
    return names


def test_every_opd_env_name_is_a_settings_field():
    names = all_env_names()
    assert {"OPD_HOST", "OPD_ENGINE", "OPD_REDIS_URL", "OPD_TEACHER_URL", "OPD_SCORER_METRICS_PORT"} <= set(names)
    unknown = {n: sorted(w) for n, w in names.items() if field_of(n) not in FIELDS and field_of(n) not in PENDING}
    assert not unknown, f"env vars that no Settings field reads (typo? or add the field): {unknown}"


def _check_values(where: str, env: dict) -> None:
    known = {field_of(k): v for k, v in env.items()
             if k.startswith("OPD_") and v is not None and field_of(k) in FIELDS}
    known = {k: re.sub(r"\$\([A-Z_]+\)", "secret", v) for k, v in known.items()}  # k8s $(VAR) refs
    try:
        Settings.load(**known)
    except Exception as e:  # ConfigError names the variable, its value and the reason
        pytest.fail(f"{where}: {e}")
    for k, v in env.items():
        if k.startswith("OPD_") and field_of(k) in PENDING and v is not None:
            assert int(v) == PENDING[field_of(k)], f"{where}: {k}={v}"


def test_every_env_value_is_accepted_by_settings():
    for svc, env in compose_envs().items():
        _check_values(f"compose:{svc}", env)
    for where, env in k8s_envs():
        _check_values(f"k8s:{where}", env)


def test_bad_value_is_caught_by_the_check():
    with pytest.raises(pytest.fail.Exception, match="OPD_HTTP_PORT"):
        _check_values("probe", {"OPD_HTTP_PORT": "eighty"})


def test_pending_fields_agree_with_settings_once_landed():
    for name, default in PENDING.items():
        if name in FIELDS:
            assert FIELDS[name].default == default, f"OPD_{name.upper()} default moved: update deploy files"


def test_compose_ports_and_urls_match_settings():
    svcs, envs = compose()["services"], compose_envs()
    teacher = envs["teacher"]
    http, grpc = int(teacher["OPD_HTTP_PORT"]), int(teacher["OPD_GRPC_PORT"])
    assert (http, grpc) == (field_default("http_port"), field_default("grpc_port"))
    assert {p.split(":")[-1] for p in svcs["teacher"]["ports"]} == {str(http), str(grpc)}
    for svc in ("scorer", "trainer"):
        url = urlsplit(envs[svc]["OPD_TEACHER_URL"])
        assert (url.scheme, url.hostname, url.port) == ("grpc", "teacher", grpc)
        assert urlsplit(envs[svc]["OPD_REDIS_URL"]).hostname == "redis"
    assert int(envs["scorer"]["OPD_SCORER_METRICS_PORT"]) == field_default("scorer_metrics_port")
    assert int(envs["trainer"]["OPD_TRAINER_METRICS_PORT"]) == field_default("trainer_metrics_port")
    drain = float(teacher.get("OPD_DRAIN_TIMEOUT_S", field_default("drain_timeout_s")))
    assert int(svcs["teacher"]["stop_grace_period"].rstrip("s")) > drain
    for svc in ("teacher", "scorer", "trainer"):  # health checks hit the port the service serves
        port = {"teacher": http, "scorer": 9100, "trainer": 9101}[svc]
        assert f"127.0.0.1:{port}/" in envs[svc]["HEALTHCHECK_URL"]


def test_prometheus_scrapes_the_ports_the_services_serve():
    prom = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    ports = {j["job_name"]: {c["port"] for c in j["dns_sd_configs"]} for j in prom["scrape_configs"]}
    assert ports == {"opd-teacher": {field_default("http_port")},
                     "opd-scorer": {field_default("scorer_metrics_port")},
                     "opd-trainer": {field_default("trainer_metrics_port")}}
    names = {n for j in prom["scrape_configs"] for c in j["dns_sd_configs"] for n in c["names"]}
    assert names <= set(compose()["services"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_ports_probes_and_grace_match_settings(overlay):
    docs = render(overlay)
    dep = find(docs, "Deployment", "opd-teacher")[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = env_of(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(env["OPD_HTTP_PORT"]), "grpc": int(env["OPD_GRPC_PORT"])}
    assert (ports["http"], ports["grpc"]) == (field_default("http_port"), field_default("grpc_port"))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] in ROUTES and c[probe]["httpGet"]["port"] == "http"
    drain = float(env.get("OPD_DRAIN_TIMEOUT_S") or field_default("drain_timeout_s"))
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    assert env["OPD_HOST"] == "0.0.0.0"
    assert env["OPD_CACHE_DIR"] in {m["mountPath"] for m in c["volumeMounts"]}  # writable (read-only root)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_clients_point_at_the_services(overlay):
    docs = render(overlay)
    grpc_svc = find(docs, "Service", "opd-teacher-grpc-headless")[0]
    assert grpc_svc["spec"]["clusterIP"] == "None"     # one DNS record per pod: clients balance per request
    redis_svc = find(docs, "Service", "opd-redis")[0]
    for wl, role, port_field in (("opd-scorer", "scorer", "scorer_metrics_port"),
                                 ("opd-trainer", "trainer", "trainer_metrics_port")):
        (w,) = [d for d in docs if d["kind"] in ("Deployment", "Job") and d["metadata"]["name"] == wl]
        c = w["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c)
        teacher = urlsplit(env["OPD_TEACHER_URL"])
        assert (teacher.scheme, teacher.hostname, teacher.port) == (
            "grpc+dns", f"{grpc_svc['metadata']['name']}.opd.svc.cluster.local", grpc_svc["spec"]["ports"][0]["port"])
        redis = urlsplit(env["OPD_REDIS_URL"])
        assert (redis.username, redis.hostname, redis.port) == (role, redis_svc["metadata"]["name"], 6379)
        metrics_port = int(env[f"OPD_{port_field.upper()}"])
        assert metrics_port == field_default(port_field) == c["ports"][0]["containerPort"]
        assert c["args"][0] == (role if role == "scorer" else "train")
