"""/docs works air-gapped: headless Chromium on loopback, with every other host unresolvable,
renders the Swagger UI operations list from assets the teacher serves itself (no CDN).
The screenshot is kept under test-artifacts/ (OPD_TEST_ARTIFACTS overrides)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from opd_services.teacher.engines.uniform_engine import UniformEngine
from opd_services.teacher.server import BackgroundTeacher

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = Path(os.environ.get("OPD_TEST_ARTIFACTS", REPO / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         # air-gapped: every host but loopback fails to resolve, so a CDN asset cannot load
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--window-size=1280,1600"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        how = "apt-get install chromium (Debian); `make tools` installs it"
        if os.environ.get("CI"):
            pytest.fail(f"chromium missing in CI: {how}")
        pytest.skip(f"chromium not installed: {how}")
    return path


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def docs_url(settings):
    with BackgroundTeacher(settings, engine=lambda: UniformEngine(vocab_size=64, max_model_len=128)) as t:
        yield f"{t.http_url}/docs"


def test_docs_page_references_only_local_assets(docs_url):
    html = httpx.get(docs_url).text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert refs, html[:500]
    external = [r for r in refs if r.startswith(("http://", "https://", "//"))]
    assert not external, f"/docs loads from other hosts: {external}"
    for r in refs:
        if r.endswith((".js", ".css")):
            assert httpx.get(httpx.URL(docs_url).join(r)).status_code == 200, r


def test_docs_render_the_operations_list_in_headless_chromium(docs_url, tmp_path):
    dom = _run(["--dump-dom", docs_url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    paths = set(re.findall(r'data-path="([^"]+)"', dom.stdout))
    assert {"/v1/score", "/v1/generate", "/v1/model", "/healthz"} <= paths, (sorted(paths), dom.stdout[:1000])
    assert dom.stdout.count('class="opblock opblock-') >= len(paths)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "docs-offline.png"
    shot.unlink(missing_ok=True)
    png = _run([f"--screenshot={shot}", docs_url], tmp_path / "profile-shot")
    assert png.returncode == 0 and shot.stat().st_size > 10_000, png.stderr[-2000:]
