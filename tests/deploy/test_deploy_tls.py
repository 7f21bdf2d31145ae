"""k8s/components/tls and the compose profile "tls": the teacher serves TLS from a mounted
certificate Secret, probes speak HTTPS, scorer and trainer use grpcs:// with the CA bundle.
Rendered by kubectl's kustomize (the cpu overlay plus the component) and validated strictly."""
from __future__ import annotations

import shutil

import kubernetes_validate
import pytest
import yaml

from deploy_helpers import COMPOSE, COMPOSE_ENV, REPO, _kustomize_ok, env_of, find, require_tool, run

SECRET_FILES = {"tls.crt", "tls.key"}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    kubectl = require_tool("kubectl")
    if not _kustomize_ok(kubectl):
        pytest.skip("kubectl embeds kustomize < v4.2")
    root = tmp_path_factory.mktemp("k8s")
    shutil.copytree(REPO / "k8s", root / "k8s")
    overlay = root / "k8s" / "overlays" / "cpu-tls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../cpu]\ncomponents: [../../components/tls]\n")
    proc = run([kubectl, "kustomize", str(overlay)])
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _container(docs, kind, name):
    return find(docs, kind, name)[0]["spec"]["template"]["spec"]


def test_tls_component_validates_and_wires_the_secret(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            kubernetes_validate.validate(d, "1.37.0", strict=True)
    pod = _container(docs, "Deployment", "opd-teacher")
    c = pod["containers"][0]
    env = env_of(c)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    assert env["OPD_TLS_CERT"] == f"{mount['mountPath']}/tls.crt" and env["OPD_TLS_KEY"] == f"{mount['mountPath']}/tls.key"
    vol = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert vol["secret"]["secretName"] == "opd-teacher-tls"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS", probe
    assert env["OPD_DRAIN_TIMEOUT_S"] == "25"             # the base env survives the patch
    for kind, name in (("Deployment", "opd-scorer"), ("Job", "opd-trainer")):
        c = _container(docs, kind, name)["containers"][0]
        env = env_of(c)
        assert env["OPD_TEACHER_URL"].startswith("grpcs://") and env["OPD_TLS_CA"].endswith("/ca.crt"), name
        assert "OPD_REDIS_URL" in env, name


def test_compose_tls_profile():
    svcs = yaml.safe_load(COMPOSE.read_text())["services"]
    t, s = svcs["teacher-tls"], svcs["scorer-tls"]
    assert t["profiles"] == ["tls"] and s["profiles"] == ["tls"]
    assert t["environment"]["OPD_TLS_CERT"].startswith("/etc/opd/tls/")
    assert s["environment"]["OPD_TEACHER_URL"].startswith("grpcs://teacher-tls:")
    assert s["environment"]["OPD_TLS_CA"].startswith("/etc/opd/tls/")
    compose = require_tool("docker-compose")
    proc = run([compose, "-f", str(COMPOSE), "--profile", "tls", "config", "-q"], env=COMPOSE_ENV)
    assert proc.returncode == 0, proc.stderr
