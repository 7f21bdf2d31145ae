"""A missing validator skips the deploy test saying how to install it, except in CI (`CI` set),
where it fails the run with the same install command: run on one promtool test in a pytest
subprocess whose PATH holds no promtool."""
from __future__ import annotations

import os
import subprocess
import sys

from deploy_helpers import INSTALL, REPO


def _run_without_promtool(ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = "/nonexistent"                   # require_tool also looks in the venv's bin: no promtool there
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/deploy/test_deploy_monitoring.py::test_promtool_check_rules"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_missing_validator_skips_locally_and_fails_in_ci():
    local = _run_without_promtool(ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout[-2000:]
    assert INSTALL["promtool"] in local.stdout
    ci = _run_without_promtool(ci=True)
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout[-2000:]
    assert "CI is set" in ci.stdout and INSTALL["promtool"] in ci.stdout
