"""The native API scores text and chat messages with the model folder's own tokenizer and chat
template (tiny Qwen3 / Llama-3 / Gemma-3 bodies with their real tokenizers), over HTTP and gRPC:
ids equal the tokenizer's, numbers equal a float64 reference on those ids, offsets and message
spans point at the right characters and tokens; and every bad text input is a 422 /
INVALID_ARGUMENT naming the field, after which the teacher keeps serving."""
from __future__ import annotations

import json
import shutil

import grpc
import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_client import InvalidRequest, Sequence, TeacherClient, tokenizer_fingerprint
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2? Say it with an emoji 😀"},
        {"role": "assistant", "content": "4 ✅ — easy."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, naturally."}]


@pytest.fixture(scope="module")
def reference(qwen3_model):
    """log p(token_i | tokens_<i) of the model's own forward() in float64."""
    model = AutoModelForCausalLM.from_pretrained(qwen3_model, dtype=torch.float64).eval()

    def logprobs(ids, s):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([list(ids)])).logits[0], -1)
        return logp[torch.arange(s - 1, len(ids) - 1), torch.tensor(ids[s:])].numpy()
    return logprobs


@pytest.fixture(scope="module")
def hf_tok(qwen3_model):
    return AutoTokenizer.from_pretrained(qwen3_model)


@pytest.fixture(params=["http", "grpc"])
def client(request, text_teacher):
    url = text_teacher.http_url if request.param == "http" else text_teacher.grpc_url
    with TeacherClient(url, timeout=60) as c:
        yield c


def test_text_ids_numbers_and_offsets(client, hf_tok, reference):
    text = "Q: what is 12*12? A: 144, I think 🤔 — café."
    b = text.index(" 144")
    out = client.score([Sequence(id="t", text=text, score_from_char=b)], top_k=3)
    r = out.results[0]
    enc = hf_tok(text, return_offsets_mapping=True)
    assert r.token_ids_L.tolist() == enc["input_ids"]
    assert r.score_from == next(i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= b)
    assert r.offsets_T_2.tolist() == [list(o) for o in enc["offset_mapping"][r.score_from:]]
    assert r.offsets_T_2[0][0] == b and r.offsets_T_2[-1][1] == len(text)   # the scored tokens cover text[b:]
    np.testing.assert_allclose(r.logprobs_T, reference(r.token_ids_L.tolist(), r.score_from), atol=1e-4)
    assert r.top_ids_T_K.shape == (len(r.logprobs_T), 3)


def test_text_default_boundary_scores_all_but_the_first_token(client, hf_tok):
    r = client.score([Sequence(text="one two three")]).results[0]
    assert r.score_from == 1 and len(r.logprobs_T) == len(hf_tok("one two three")["input_ids"]) - 1


def test_messages_render_with_the_models_template(client, hf_tok, reference):
    r = client.score([Sequence(id="c", messages=CHAT)]).results[0]
    want = hf_tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert r.token_ids_L.tolist() == list(want)
    assert r.text == hf_tok.apply_chat_template(CHAT, tokenize=False)
    spans = r.message_spans_M_2
    assert spans.shape == (len(CHAT), 2)
    for m, (a, b) in zip(CHAT, spans):   # each turn: its content, then the end-of-turn token
        assert hf_tok.decode(r.token_ids_L[a:b]) == m["content"] + "<|im_end|>"
    assert r.score_from == spans[2][0]   # the first assistant turn
    np.testing.assert_allclose(r.logprobs_T, reference(r.token_ids_L.tolist(), r.score_from), atol=1e-4)
    # offsets point into the rendered text
    a, b = spans[4]
    t0 = a - r.score_from
    assert r.text[r.offsets_T_2[t0][0]:r.offsets_T_2[b - 2 - r.score_from][1]] == "6, naturally."


def test_a_message_may_say_whether_it_is_scored(client):
    msgs = [dict(m) for m in CHAT]
    msgs[1]["score"] = True
    msgs[2]["score"] = False
    r = client.score([Sequence(messages=msgs)]).results[0]
    assert r.score_from == r.message_spans_M_2[1][0]


def test_model_info_names_the_tokenizer(client, qwen3_model, hf_tok):
    tok = client.model().tokenizer
    assert tok is not None
    fp = tokenizer_fingerprint(qwen3_model)
    assert (tok.files_sha256, tok.chat_template_sha256) == (fp["files_sha256"], fp["chat_template_sha256"])
    assert tok.vocab_size == len(hf_tok) == 151_669
    assert tok.special_ids["eos"] == hf_tok.eos_token_id and tok.special_ids["pad"] == hf_tok.pad_token_id


def test_bos_and_add_special_tokens(gemma3_model, llama3_model, cache_dir):
    """Gemma-3's tokenizer adds BOS to text (add_special_tokens false: not); a chat template writes its
    own BOS and nothing adds another (Llama-3, Gemma-3)."""
    from opd_services.config import Settings
    from opd_services.teacher.server import BackgroundTeacher
    for folder in (gemma3_model, llama3_model):
        hf = AutoTokenizer.from_pretrained(folder)
        s = Settings(model=str(folder), device="cpu", http_port=0, grpc_port=0, cache_dir=cache_dir)
        with BackgroundTeacher(s) as t, TeacherClient(t.http_url) as c:
            text = c.score([Sequence(text="Hello world, again")]).results[0]
            bare = c.score([Sequence(text="Hello world, again")], add_special_tokens=False).results[0]
            chat = c.score([Sequence(messages=CHAT[1:3])]).results[0]
        assert text.token_ids_L.tolist() == hf("Hello world, again")["input_ids"]
        assert bare.token_ids_L.tolist() == hf("Hello world, again", add_special_tokens=False)["input_ids"]
        assert chat.token_ids_L.tolist() == list(hf.apply_chat_template(CHAT[1:3], tokenize=True, return_dict=False))
        assert chat.token_ids_L.tolist().count(hf.bos_token_id) == 1
    assert text.token_ids_L[0] != hf.bos_token_id   # Llama-3's tokenizer.json (this package) adds no BOS to text
    hf = AutoTokenizer.from_pretrained(gemma3_model)
    assert hf("x")["input_ids"][0] == hf.bos_token_id


def test_gemma3_turn_spans(gemma3_model):
    from opd_services.teacher.text.chat import render
    from opd_services.teacher.text.tokenizer import load_tokenizer
    tok = load_tokenizer(gemma3_model)
    chat = render(tok, CHAT)
    hf = AutoTokenizer.from_pretrained(gemma3_model)
    assert chat.encoded.ids_L.tolist() == list(hf.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    for m, (a, b) in zip(CHAT[1:], chat.spans_M_2[1:]):
        assert hf.decode(chat.encoded.ids_L[a:b]) == m["content"] + "<end_of_turn>"


# ---- bad input: a 422 / INVALID_ARGUMENT naming the field, then the teacher keeps serving ----------

BAD = [
    ({"text": "abc def", "score_from_char": 2}, "sequences[0].score_from_char", "inside token"),
    ({"text": "abc def", "score_from_char": 99}, "sequences[0].score_from_char", "[0, 7]"),
    ({"text": "abc", "token_ids": [1, 2]}, "sequences[0]", "exactly one"),
    ({"text": "abc def", "score_from": 2}, "sequences[0].score_from", "score_from_char"),
    ({"token_ids": [1, 2, 3], "score_from_char": 1}, "sequences[0].score_from_char", "text only"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "sequences[0].messages[0].role", "unknown role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "sequences[0].messages", "no message is scored"),
    ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
     "sequences[0].messages[0].content", "string"),
    ({"messages": []}, "sequences[0].messages", "non-empty"),
    ({"text": "word " * 5000}, "sequences[0].text", "tokens"),
    ({"text": "a"}, "sequences[0].text", "at least 2"),
]


@pytest.mark.parametrize("seq,field,says", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_text_input_http(text_teacher, seq, field, says):
    r = httpx.post(text_teacher.http_url + "/v1/score", json={"sequences": [seq]}, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and says in err["reason"], err
    assert httpx.post(text_teacher.http_url + "/v1/score", json={"sequences": [{"text": "still here"}]}).status_code == 200


def test_too_long_text_says_how_many_tokens(text_teacher):
    r = httpx.post(text_teacher.http_url + "/v1/score", json={"sequences": [{"text": "word " * 5000}]}).json()
    assert "5001 tokens long" in r["error"]["reason"] and "4096" in r["error"]["reason"]   # "word " * 5000 + ""


def test_lone_surrogate_http_and_grpc(text_teacher):
    raw = '{"sequences": [{"text": "bad \\ud800 text"}]}'
    r = httpx.post(text_teacher.http_url + "/v1/score", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sequences[0].text", r.text
    assert "surrogate" in r.json()["error"]["reason"]
    for url in (text_teacher.http_url, text_teacher.grpc_url):   # the client refuses it before sending
        with TeacherClient(url) as c:
            with pytest.raises(InvalidRequest) as e:
                c.score([Sequence(text="ok"), Sequence(messages=[{"role": "user", "content": "x\ud800"}])])
            assert e.value.field == "sequences[1].messages[0].content"
            with pytest.raises(InvalidRequest) as e:
                c.score([Sequence(text="x\udfff")])
            assert e.value.field == "sequences[0].text"


# what protobuf can carry (content is a string; an empty repeated field is no field)
GRPC_BAD = [b for b in BAD if b[0].get("messages") != []
            and not any(isinstance(m.get("content"), int) for m in b[0].get("messages", []))]


@pytest.mark.parametrize("seq,field,says", GRPC_BAD, ids=[b[1] + ":" + b[2] for b in GRPC_BAD])
def test_bad_text_input_grpc(text_teacher, seq, field, says):
    msg = pb.ScoreRequest(sequences=[_proto_seq(seq)])
    with grpc.insecure_channel(text_teacher.grpc_url.removeprefix("grpc://")) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.TeacherStub(ch).Score(msg, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":") and says in e.value.details(), e.value.details()
        ok = pb_grpc.TeacherStub(ch).Score(pb.ScoreRequest(sequences=[pb.Sequence(text="still here")]), timeout=30)
        assert len(ok.results[0].token_ids) >= 2


def _proto_seq(seq: dict) -> pb.Sequence:
    out = pb.Sequence(token_ids=seq.get("token_ids", []), score_from=seq.get("score_from", 0))
    if "text" in seq:
        out.text = seq["text"]
    if "score_from_char" in seq:
        out.score_from_char = seq["score_from_char"]
    out.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in seq.get("messages", []))
    return out


def test_grpc_bad_chat_template_kwargs(text_teacher):
    msg = pb.ScoreRequest(sequences=[pb.Sequence(text="hello there")], chat_template_kwargs_json="[1, 2")
    with grpc.insecure_channel(text_teacher.grpc_url.removeprefix("grpc://")) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.TeacherStub(ch).Score(msg, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat_template_kwargs_json" in e.value.details()


def test_text_without_a_tokenizer(teacher):
    """The session's tiny model folder has no tokenizer files: text and messages say so."""
    for seq, field in (({"text": "hello"}, "sequences[0].text"),
                       ({"messages": [{"role": "assistant", "content": "x"}]}, "sequences[0].messages")):
        r = httpx.post(teacher.http_url + "/v1/score", json={"sequences": [seq]})
        assert r.status_code == 422 and r.json()["error"]["field"] == field
        assert "has none" in r.json()["error"]["reason"]
    assert httpx.get(teacher.http_url + "/v1/model").json()["tokenizer"] is None
    assert httpx.post(teacher.http_url + "/v1/score", json={"sequences": [{"token_ids": [1, 2, 3]}]}).status_code == 200


def test_messages_without_a_chat_template(qwen3_model, tmp_path, cache_dir):
    from opd_services.config import Settings
    from opd_services.teacher.server import BackgroundTeacher
    folder = tmp_path / "no-template"
    shutil.copytree(qwen3_model, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    s = Settings(model=str(folder), device="cpu", http_port=0, grpc_port=0, cache_dir=cache_dir)
    with BackgroundTeacher(s) as t:
        body = {"sequences": [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]}
        r = httpx.post(t.http_url + "/v1/score", json=body)
        assert r.status_code == 422 and r.json()["error"]["field"] == "sequences[0].messages", r.text
        assert "no chat template" in r.json()["error"]["reason"]
        assert httpx.get(t.http_url + "/v1/model").json()["tokenizer"]["chat_template_sha256"] == ""
        assert httpx.post(t.http_url + "/v1/score", json={"sequences": [{"text": "plain text works"}]}).status_code == 200
