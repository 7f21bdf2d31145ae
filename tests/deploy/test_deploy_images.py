"""docker/: the Dockerfiles pass hadolint (from the services' dev extra) and keep the image
rules: pinned bases and torch, non-root user, health check, small build context. The CPU image
is built and run by test_deploy_image_run.py (podman); the GPU image is not built here (its base
is the vLLM image; bench/gpu_check.sh builds it on a GPU machine)."""
from __future__ import annotations

import re
import tomllib

import pytest

from deploy_helpers import REPO, require_tool, run

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def test_there_are_cpu_and_gpu_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}


def test_hadolint_passes():
    hadolint = require_tool("hadolint")
    proc = run([hadolint, "--failure-threshold", "info", *map(str, DOCKERFILES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_an_unpinned_install(tmp_path):
    hadolint = require_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    proc = run([hadolint, str(bad)])
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def _final_stage(text: str) -> str:
    return re.split(r"^FROM ", text, flags=re.M)[-1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_rules(path):
    text = path.read_text()
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)", text, flags=re.M)
    assert bases and all(re.search(r":v?\d+\.\d+\.\d+", b) for b in bases), f"unpinned base image: {bases}"
    final = _final_stage(text)
    user = re.findall(r"^USER (\S+)", final, flags=re.M)
    assert user and user[-1].split(":")[0] not in {"0", "root"}, "the final stage must run as non-root"
    assert "HEALTHCHECK" in final and "HEALTHCHECK_URL" in final
    assert re.search(r'ENTRYPOINT \["opd"\]', final)


def test_cpu_image_pins_the_same_torch_as_the_package():
    deps = tomllib.loads((REPO / "services" / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in deps if d.startswith("torch")]
    text = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert f'"{torch_pin}"' in text and "download.pytorch.org/whl/cpu" in text


def test_build_context_is_only_the_packages():
    lines = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "**" and {"!client/", "!services/"} <= set(lines)
    for path in DOCKERFILES:
        for src in re.findall(r"^COPY (?!--from)(\S+)", path.read_text(), flags=re.M):
            assert src in {"client", "services"}, f"{path.name} copies {src}, which .dockerignore excludes"
