"""ms-swift's GKD teacher client, unmodified, against a real `opd serve` (vLLM /v1/completions dialect).

ms-swift 4.2 (`swift.rlhf_trainers.gkd_trainer.fetch_teacher_logprobs`) pins transformers < 5.9,
trl < 1.0 and datasets < 4.8.5, which cannot coexist with this project's pins (transformers 5.16+,
trl 1.16+). So the test builds its own virtualenv once, in a cached location (OPD_MS_SWIFT_VENV,
default ~/.cache/opd/ms-swift-4.2-venv): ms-swift and its pins installed there, and this
interpreter's site-packages appended to its path (a .pth file) so it reuses our CPU torch instead
of pulling a CUDA build. First build ~4 min (PyPI); later runs reuse it. It skips, saying why, only
when that virtualenv cannot be built (no PyPI); anything else is a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from opd_client import Sequence, TeacherClient
from opd_services.teacher.process import TeacherProcess

pytestmark = pytest.mark.slow
MS_SWIFT = "ms-swift==4.2.*"
SEQS = [[5, 9, 17, 3, 3, 80, 1, 2, 64, 99], [1, 2, 3, 4, 5, 6], [7, 7, 7, 100, 12, 13, 14, 15, 16, 17]]
CALL = """
import json, sys
from swift.rlhf_trainers.gkd_trainer import fetch_teacher_logprobs
for topk in json.loads(sys.argv[3]):
    lp, ix, lens = fetch_teacher_logprobs(sys.argv[1], json.loads(sys.argv[2]), topk=topk)
    print("RESULT " + json.dumps({"topk": topk, "logprobs": lp.tolist(), "indices": ix.tolist(), "lens": lens}))
"""


def _share_our_site(py: Path) -> None:
    """Put this interpreter's site-packages last on the cached venv's path (our torch): rewritten on
    every run, since the cache outlives the checkout whose virtualenv built it."""
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "zz_opd_shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def _venv() -> Path:
    root = Path(os.environ.get("OPD_MS_SWIFT_VENV", Path.home() / ".cache/opd/ms-swift-4.2-venv"))
    py = root / "bin/python"
    if (root / ".built").exists():
        _share_our_site(py)
        return py
    import torch
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    _share_our_site(py)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", MS_SWIFT, f"torch=={torch.__version__}"],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        pytest.skip(f"could not build the ms-swift virtualenv at {root} (needs PyPI): {r.stderr[-600:]}")
    (root / ".built").write_text(MS_SWIFT + "\n")
    return py


@pytest.fixture(scope="module")
def ms_swift_python() -> Path:
    return _venv()


@pytest.fixture(scope="module")
def opd_serve(tiny_model):
    """A real `opd serve` process on loopback (torch engine, the tiny model)."""
    with TeacherProcess(OPD_MODEL=str(tiny_model), OPD_AUTH="off", OPD_DEVICE="cpu", OPD_MAX_TOP_K="20") as t:
        yield t.http_url


def test_fetch_teacher_logprobs_unmodified(ms_swift_python, opd_serve):
    """ms-swift's own call (one process, top-k 1 and 5: importing swift takes ~1 min)."""
    r = subprocess.run([str(ms_swift_python), "-c", CALL, opd_serve, json.dumps(SEQS), "[1, 5]"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    outs = [json.loads(x.removeprefix("RESULT ")) for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and len(outs) == 2, r.stderr[-2000:]
    for out in outs:
        topk = out["topk"]
        assert out["lens"] == [len(s) for s in SEQS]
        with TeacherClient(opd_serve) as c:      # ms-swift sends temperature 0: raw logits, as /v1/score at T = 1
            native = c.score([Sequence(token_ids=s) for s in SEQS], top_k=topk).results
        for i, (seq, res) in enumerate(zip(SEQS, native)):
            n = len(seq) - 1
            np.testing.assert_allclose(np.array(out["logprobs"][i][:n]), res.top_logprobs_T_K, atol=1e-5)
            assert np.array(out["indices"][i][:n]).tolist() == res.top_ids_T_K.tolist()
            assert all(v == -np.inf for row in out["logprobs"][i][n:] for v in row)   # ms-swift's own padding
