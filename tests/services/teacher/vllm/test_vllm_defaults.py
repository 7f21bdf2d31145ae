"""Every engine on default settings (OPD_DTYPE=auto) against a float64 log-softmax reference:
a float32 checkpoint is served in float32 by the vLLM engine too (vLLM's own `auto` would
downcast it to bfloat16 on CPU). Uses the session's vLLM teacher (conftest: dtype unset)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_client import TeacherClient
from opd_client.types import Sequence

pytestmark = pytest.mark.vllm


def float64_reference(model_dir, ids: np.ndarray, s: int) -> np.ndarray:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0]
    return torch.log_softmax(logits[s - 1:-1], -1).numpy()


@pytest.mark.parametrize("engine", ["vllm", "torch"])
def test_default_dtype_matches_float64(engine, vllm_teacher, torch_teacher, vllm_model):
    teacher = vllm_teacher if engine == "vllm" else torch_teacher
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, 128, 40)
    seqs = [Sequence(token_ids=np.concatenate([prompt, rng.integers(0, 128, 12)]), score_from=40, id=str(i))
            for i in range(3)]                                        # a group: prefix sharing where the engine has it
    with TeacherClient(teacher.http_url) as c:
        out = c.score(seqs, top_k=5)
    assert out.model.dtype == "float32" and out.model.engine == engine
    for s, r in zip(seqs, out.results):
        ref_T_V = float64_reference(vllm_model, np.asarray(s.token_ids), 40)
        t = np.arange(ref_T_V.shape[0])
        np.testing.assert_allclose(r.logprobs_T, ref_T_V[t, np.asarray(s.token_ids)[40:]], atol=1e-4, rtol=0)
        np.testing.assert_allclose(r.top_logprobs_T_K, -np.sort(-ref_T_V, 1)[:, :5], atol=1e-4, rtol=0)
