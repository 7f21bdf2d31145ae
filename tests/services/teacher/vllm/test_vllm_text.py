"""The vLLM engine behind the same text layer: a teacher on the tiny Qwen3 (real tokenizer and chat
template) scores text and chat messages with the ids the tokenizer gives, numbers equal to the
torch engine's on the same folder, and names the same tokenizer."""
from __future__ import annotations

import numpy as np
import pytest

from opd_client import Sequence, TeacherClient

pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "Name a prime above 10. 🙂"}, {"role": "assistant", "content": "11 — the first."}]


@pytest.fixture(scope="module")
def vllm_text_teacher(vllm_ok, qwen3_model, cache_dir):
    from opd_services.config import Settings
    from opd_services.teacher.server import BackgroundTeacher
    s = Settings(model=str(qwen3_model), engine="vllm", device="cpu", host="127.0.0.1", http_port=0, grpc_port=0,
                 cache_dir=cache_dir, max_top_k=20, drain_timeout_s=5)
    with BackgroundTeacher(s) as t:
        yield t


def test_text_and_messages_match_the_torch_engine(vllm_text_teacher, text_teacher):
    seqs = [Sequence(id="t", text="The answer is 42, naturally — café ☕", score_from_char=13),
            Sequence(id="m", messages=CHAT)]
    with TeacherClient(vllm_text_teacher.grpc_url) as v, TeacherClient(text_teacher.grpc_url) as t:
        ours, ref = v.score(seqs, top_k=3), t.score(seqs, top_k=3)
        assert v.model().tokenizer == t.model().tokenizer
    for a, b in zip(ours.results, ref.results):
        assert a.token_ids_L.tolist() == b.token_ids_L.tolist() and a.score_from == b.score_from
        assert a.offsets_T_2.tolist() == b.offsets_T_2.tolist()
        np.testing.assert_allclose(a.logprobs_T, b.logprobs_T, atol=1e-4)
        np.testing.assert_allclose(a.top_logprobs_T_K, b.top_logprobs_T_K, atol=1e-4)
    assert ours.model.engine == "vllm" and ours.results[1].message_spans_M_2.tolist() == ref.results[1].message_spans_M_2.tolist()
