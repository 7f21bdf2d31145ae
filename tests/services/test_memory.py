"""`reuse_freed_memory`: after it, the large activations of one forward reuse the memory the
last forward freed instead of being page-faulted in again (glibc's default maps every block over
its 32 MB ceiling afresh and unmaps it on free). Each case runs in a fresh interpreter: the
setting is process-wide and cannot be undone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
