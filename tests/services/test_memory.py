"""`reuse_freed_memory`: after it, the large activations of one forward reuse the memory the
last forward freed instead of being page-faulted in again (glibc's default maps every block over
its 32 MB ceiling afresh and unmaps it on free). Each case runs in a fresh interpreter: the
setting is process-wide and cannot be undone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PROBE = """
import json, resource, sys
import torch
from opd_services.memory import give_back_free_memory, reuse_freed_memory
ok = reuse_freed_memory() if sys.argv[1] == "on" else None
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
torch.set_num_threads(1)
x = torch.randn(8192, 256); w1 = torch.randn(1024, 256); w2 = torch.randn(256, 1024)
def forward(x):                       # a decoder's MLP: 32 MB intermediates, made and freed per layer
    for _ in range(4):
        x = x + torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, w1)), w2)
    return x
forward(x)
forward(x)                            # two warm-ups: the heap reaches its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    forward(x)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = rss()
trimmed = give_back_free_memory(every_s=0)
print(json.dumps({"ok": ok, "faults": faults, "held": held, "trimmed": trimmed, "after_trim": rss()}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def thp_always() -> bool:
    f = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return f.exists() and "[always]" in f.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.skipif(thp_always(), reason="transparent huge pages always on: faults count 2 MB pages, not 4 KB")
def test_freed_activations_are_reused_not_faulted_in_again():
    default, reuse = probe("off"), probe("on")
    assert default["faults"] > 5 * 4 * (32 << 20) // 4096, default     # each 32 MB block mapped afresh (4 KB pages)
    assert reuse["ok"] is True
    assert reuse["faults"] < default["faults"] // 20, (default, reuse)
    # the free memory kept for reuse goes back to the OS when asked (the batcher: once a minute)
    assert default["trimmed"] is False and reuse["trimmed"] is True
    assert reuse["held"] - reuse["after_trim"] > 32 << 20, reuse


class FakeLibc:
    """Stands in for libc: records mallopt settings and malloc_trim calls (no process-wide change)."""

    opened: list = []

    def __init__(self, name):
        FakeLibc.opened.append(name)
        self.settings = []

    def mallopt(self, param, value):
        self.settings.append((param, value))
        return 1

    def malloc_trim(self, pad):
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    import ctypes.util
    from opd_services import memory
    FakeLibc.opened = []
    monkeypatch.setattr(memory, "ctypes", SimpleNamespace(CDLL=FakeLibc, util=ctypes.util))
    monkeypatch.setattr(memory, "_trim", None)
    monkeypatch.setattr(memory, "_last_trim", 0.0)
    return memory


def test_libc_is_opened_once(fake_libc):
    assert fake_libc.reuse_freed_memory() is True
    assert len(FakeLibc.opened) == 1


def test_free_pages_go_back_at_most_once_a_minute(fake_libc, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(fake_libc, "time", SimpleNamespace(monotonic=lambda: now[0]))
    assert fake_libc.give_back_free_memory() is False          # reuse off: never trims
    assert fake_libc.reuse_freed_memory() is True
    calls = []
    monkeypatch.setattr(fake_libc, "_trim", lambda pad: calls.append(now[0]))
    assert fake_libc.TRIM_EVERY_S == 60.0
    for t in (1000.0, 1030.0, 1059.9):                          # within a minute of start-up: nothing
        now[0] = t
        assert fake_libc.give_back_free_memory() is False
    now[0] = 1060.0
    assert fake_libc.give_back_free_memory() is True
    for t in (1060.0, 1100.0, 1119.9):                          # within a minute of the last trim
        now[0] = t
        assert fake_libc.give_back_free_memory() is False
    now[0] = 1120.0
    assert fake_libc.give_back_free_memory() is True
    assert calls == [1060.0, 1120.0]


def test_no_setting_is_changed_where_malloc_trim_is_missing(fake_libc, monkeypatch):
    """A libc with mallopt but no malloc_trim (the heap could never shrink): nothing is set."""
    class NoTrim:
        def __init__(self, name):
            self.settings = []

        def mallopt(self, param, value):
            self.settings.append((param, value))
            return 1
    made = []
    fake_libc.ctypes.CDLL = lambda name: made.append(NoTrim(name)) or made[-1]
    assert fake_libc.reuse_freed_memory() is False
    assert made[0].settings == [] and fake_libc.give_back_free_memory(every_s=0) is False
