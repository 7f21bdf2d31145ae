"""`opd demo` refuses bad flags before it starts anything: exit 2, one line naming the flag."""
from __future__ import annotations

import subprocess
import sys

import pytest

from opd_services.demo import DemoPlan
from opd_services.errors import ConfigError


@pytest.mark.parametrize("extra,flag", [
    (["--losses", "rkl,kl"], "--losses"),
    (["--losses", ""], "--losses"),
    (["--lr-opd", "0"], "--lr-opd"),
    (["--lr-sft", "-0.001"], "--lr-sft"),
    (["--group-size", "0"], "--group-size"),
    (["--group-size", "5"], "--group-size"),      # does not divide the batch of 64
    (["--task", "sorting"], "--task"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "0"], "--seeds"),
])
def test_demo_refuses_bad_flags(tmp_path, extra, flag):
    r = subprocess.run([sys.executable, "-m", "opd_services.cli", "demo", "--out", str(tmp_path / "o"), *extra],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and flag in r.stderr, r.stderr[-500:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-500:]
    assert not (tmp_path / "o").exists()          # nothing was started


def test_default_plan_is_valid_and_runs_the_walks_task():
    plan = DemoPlan().check()
    assert plan.task == "walks" and "rkl" in plan.losses and plan.group_size >= 1
    with pytest.raises(ConfigError, match="--lr-opd"):
        DemoPlan(lr_opd=0.0).check()
