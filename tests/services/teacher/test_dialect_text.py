"""The dialects' text fields (vLLM /v1/completions, /v1/chat/completions, /tokenize, /detokenize and
SGLang /generate) on a real teacher with Qwen3's real tokenizer (tests/conftest.py `text_teacher`).

Numbers are held to a float64 reference (the checkpoint loaded in float64 with transformers,
log_softmax of forward().logits) on the ids the tokenizer gives; decoded tokens to the tokenizer's own
decoding. The openai client is used unmodified. Bad input gets the dialect's own error shape naming the
field, and the teacher keeps serving.
"""
from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

TEXT = "Hi 🦩 there ñ𓀀!"                          # 🦩 and 𓀀 are split across byte-level tokens
PIECES = ["Hi", "", "", " 🦩", " there", "", " ñ", "", "", "𓀀", "!"]   # vllm serve's decoded tokens of TEXT
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦩?"},
        {"role": "assistant", "content": "Hello ñ!"}]


@pytest.fixture(scope="module")
def hf(qwen3_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(qwen3_model))


@pytest.fixture(scope="module")
def reference(qwen3_model):
    """ids -> float64 log_softmax of the model's logits, [L, V] (row i predicts token i + 1)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_model), dtype=torch.float64).eval()

    def lp(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    return lp


@pytest.fixture(scope="module")
def client(text_teacher):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=text_teacher.http_url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def name(client):
    return client.models.list().data[0].id


def _post(teacher, path: str, body) -> httpx.Response:
    """POST a JSON body (a dict), or raw bytes as they are (bodies json= cannot encode)."""
    if isinstance(body, bytes):
        return httpx.post(teacher.http_url + path, content=body, headers={"content-type": "application/json"},
                          timeout=60)
    return httpx.post(teacher.http_url + path, json=body, timeout=60)


def _check_position(d: dict, actual: int, ref_row: np.ndarray, k: int) -> None:
    """A prompt_logprobs position against the reference: actual first, top-k values and ids."""
    assert next(iter(d)) == str(actual)
    for tid, e in d.items():
        assert e["logprob"] == pytest.approx(ref_row[int(tid)], abs=1e-4)
    tops = sorted((e["logprob"] for t, e in d.items() if t != str(actual) or e["rank"] <= k), reverse=True)[:k]
    np.testing.assert_allclose(tops, np.sort(ref_row)[::-1][:k], atol=1e-4)
    assert abs(d[str(actual)]["rank"] - (1 + int((ref_row > ref_row[actual]).sum()))) <= 3   # float32 ties


# ---- /v1/completions ------------------------------------------------------------------------------

def test_openai_echo_logprobs_scores_text(client, name, hf, reference):
    """The legacy scoring call: echo + logprobs + max_tokens 0 on a text prompt."""
    out = client.completions.create(model=name, prompt=TEXT, echo=True, logprobs=3, max_tokens=0)
    ids = hf(TEXT)["input_ids"]
    lp, choice = reference(ids), out.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    got = choice.logprobs
    assert got.tokens == PIECES and "".join(got.tokens) == TEXT
    assert got.text_offset == list(np.cumsum([0] + [len(t) for t in got.tokens[:-1]]))
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    np.testing.assert_allclose(got.token_logprobs[1:], [lp[i - 1, ids[i]] for i in range(1, len(ids))], atol=1e-4)
    plp = choice.prompt_logprobs                     # echo with logprobs k also gives prompt_logprobs k (vLLM)
    for i in range(1, len(ids)):
        _check_position(plp[i], ids[i], lp[i - 1], 3)
        assert plp[i][str(ids[i])]["decoded_token"] == PIECES[i]
        # top_logprobs: the same entries keyed by their text (equal texts collapse into one key, as in vLLM)
        by_text = {}
        for e in plp[i].values():
            by_text[e["decoded_token"]] = e["logprob"]
        assert got.top_logprobs[i] == pytest.approx(by_text, abs=1e-6)
        assert max(got.top_logprobs[i].values()) == pytest.approx(lp[i - 1].max(), abs=1e-4)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0


def test_prompt_logprobs_of_text_list_with_decoded_tokens(text_teacher, hf, reference):
    texts = [TEXT, "a🧌b and more"]
    body = _post(text_teacher, "/v1/completions", {"prompt": texts, "max_tokens": 1, "prompt_logprobs": 2,
                                                   "return_token_ids": True}).json()
    for choice, text in zip(body["choices"], texts):
        ids = hf(text)["input_ids"]
        assert choice["prompt_token_ids"] == ids and choice["text"] == "" and choice["token_ids"] == []
        lp = reference(ids)
        plp = choice["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(ids)
        for i in range(1, len(ids)):
            _check_position(plp[i], ids[i], lp[i - 1], 2)
            for tid, e in plp[i].items():   # whole-character tokens decode as themselves
                alone = hf.decode([int(tid)])
                assert e["decoded_token"] == alone or alone.endswith("\ufffd")


def test_add_special_tokens_as_vllm(text_teacher):
    """Qwen3's tokenizer adds no BOS, with or without add_special_tokens: the ids are the same."""
    on = _post(text_teacher, "/v1/completions", {"prompt": "x y", "max_tokens": 1, "prompt_logprobs": 0,
                                                 "return_token_ids": True}).json()
    off = _post(text_teacher, "/v1/completions", {"prompt": "x y", "max_tokens": 1, "prompt_logprobs": 0,
                                                  "add_special_tokens": False, "return_token_ids": True}).json()
    assert on["choices"][0]["prompt_token_ids"] == off["choices"][0]["prompt_token_ids"]


def test_sampled_text_and_logprobs(text_teacher, hf, reference):
    """The torch engine samples: text is the decoded sample; tokens and logprobs as vLLM's."""
    body = _post(text_teacher, "/v1/completions", {"prompt": TEXT, "max_tokens": 5, "temperature": 0, "logprobs": 2,
                                                   "echo": True, "return_token_ids": True}).json()
    c = body["choices"][0]
    ids, out = hf(TEXT)["input_ids"], c["token_ids"]
    assert 1 <= len(out) <= 5
    stop = c["finish_reason"] == "stop"
    # with return_token_ids vLLM echoes no prompt text, only the sample's
    assert c["text"] == hf.decode(out[:-1] if stop else out, skip_special_tokens=True)
    lp = reference(ids + out)
    assert c["logprobs"]["tokens"][:len(ids)] == PIECES
    np.testing.assert_allclose(c["logprobs"]["token_logprobs"][1:], [lp[i - 1, t] for i, t in
                                                                    enumerate(ids + out) if i], atol=1e-4)
    assert [max(t, key=t.get) for t in c["logprobs"]["top_logprobs"][len(ids):]] == \
        [hf.decode([t]) for t in out]   # greedy: the sampled token is the top one


# ---- /v1/chat/completions -------------------------------------------------------------------------

def test_chat_prompt_logprobs_over_the_template(client, name, hf, reference):
    out = client.chat.completions.create(model=name, messages=CHAT, max_tokens=1, extra_body={
        "prompt_logprobs": 2, "add_generation_prompt": False, "return_token_ids": True})
    ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=False, return_dict=False)
    assert out.prompt_token_ids == ids
    lp = reference(ids)
    for i in range(1, len(ids)):
        _check_position(out.prompt_logprobs[i], ids[i], lp[i - 1], 2)
    text = "".join(out.prompt_logprobs[i][str(ids[i])]["decoded_token"] for i in range(1, len(ids)))
    assert hf.decode(ids[:1]) + text == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ""


def test_chat_sampling_and_chat_logprobs(client, name, hf, reference):
    msgs = CHAT[:2]
    out = client.chat.completions.create(model=name, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"return_token_ids": True})
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    c = out.choices[0]
    sample = c.token_ids
    stop = c.finish_reason == "stop"
    assert c.message.content == hf.decode(sample[:-1] if stop else sample, skip_special_tokens=True)
    lp = reference(ids + sample)
    for j, (tok, entry) in enumerate(zip(sample, c.logprobs.content)):
        row = lp[len(ids) + j - 1]
        assert entry.logprob == pytest.approx(row[tok], abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token   # sampled first
        assert entry.top_logprobs[0].logprob == pytest.approx(row.max(), abs=1e-4)             # greedy


def test_chat_extras_render_into_the_template(text_teacher, hf):
    tools = [{"type": "function", "function": {"name": "get_w", "description": "weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for extra, kw in [({"chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False}),
                      ({"tools": tools, "tool_choice": "none"}, {"tools": tools}),
                      ({"continue_final_message": True, "add_generation_prompt": False},
                       {"continue_final_message": True, "add_generation_prompt": False})]:
        body = {"messages": CHAT if "continue_final_message" in extra else CHAT[:2], "max_tokens": 1,
                "prompt_logprobs": 0, "return_token_ids": True, **extra}
        r = _post(text_teacher, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        want = hf.apply_chat_template(body["messages"], tokenize=True, return_dict=False,
                                      **({"add_generation_prompt": True} | kw))
        assert r.json()["prompt_token_ids"] == want, extra


# ---- /tokenize, /detokenize -----------------------------------------------------------------------

def test_tokenize_detokenize_round_trip(text_teacher, hf):
    r = _post(text_teacher, "/tokenize", {"prompt": TEXT, "return_token_strs": True}).json()
    ids = hf(TEXT)["input_ids"]
    assert r == {"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": hf.convert_ids_to_tokens(ids)}
    assert _post(text_teacher, "/detokenize", {"tokens": ids}).json() == {"prompt": TEXT}
    chat = _post(text_teacher, "/tokenize", {"messages": CHAT[:2]}).json()
    assert chat["tokens"] == hf.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True,
                                                    return_dict=False)
    assert chat["token_strs"] is None
    assert _post(text_teacher, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"] == \
        hf.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)


# ---- SGLang /generate -----------------------------------------------------------------------------

def test_sglang_text_with_texts_in_logprobs(text_teacher, hf, reference):
    body = {"text": [TEXT, "a🧌b"], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    out = _post(text_teacher, "/generate", body).json()
    for res, text in zip(out, body["text"]):
        ids = hf(text)["input_ids"]
        meta = res["meta_info"]
        assert [e[1] for e in meta["input_token_logprobs"]] == ids and meta["prompt_tokens"] == len(ids)
        assert [e[2] for e in meta["input_token_logprobs"]] == [hf.decode([i]) for i in ids]
        assert meta["input_token_logprobs"][0][0] is None and res["text"] == ""
        lp = reference(ids)
        np.testing.assert_allclose([e[0] for e in meta["input_token_logprobs"][1:]],
                                   [lp[i - 1, ids[i]] for i in range(1, len(ids))], atol=1e-4)
        for row, ref in zip(meta["input_top_logprobs"][1:], lp):
            assert [e[2] for e in row] == [hf.decode([e[1]]) for e in row]
            np.testing.assert_allclose([e[0] for e in row], np.sort(ref)[::-1][:2], atol=1e-4)


def test_sglang_text_sampling_decodes_the_output(text_teacher, hf):
    out = _post(text_teacher, "/generate", {"text": TEXT, "sampling_params": {"max_new_tokens": 4, "temperature": 0},
                                            "return_logprob": True, "return_text_in_logprobs": True}).json()
    ids = out["output_ids"]
    stop = out["meta_info"]["finish_reason"]["type"] == "stop"
    assert out["text"] == hf.decode(ids[:-1] if stop else ids, skip_special_tokens=True)
    assert [e[2] for e in out["meta_info"]["output_token_logprobs"]] == [hf.decode([i]) for i in ids]
    plain = _post(text_teacher, "/generate", {"text": TEXT, "return_logprob": True,
                                              "sampling_params": {"max_new_tokens": 0}}).json()
    assert plain["meta_info"]["input_token_logprobs"][0][2] is None           # texts only when asked


# ---- bad input: each dialect's shape, the field named, the teacher still serving -------------------

@pytest.fixture(scope="module")
def no_template_teacher(qwen3_model, text_settings, tmp_path_factory):
    """The tiny Qwen3 with its tokenizer but no chat template."""
    from opd_services.teacher.server import BackgroundTeacher
    folder = tmp_path_factory.mktemp("qwen3-no-template") / "model"
    shutil.copytree(qwen3_model, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with BackgroundTeacher(text_settings.model_copy(update={"model": str(folder)})) as t:
        yield t


def _vllm_error(r: httpx.Response, param: str, *words: str) -> None:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and (err["param"], err["code"]) == (param, 422), err
    assert all(w in err["message"] for w in words), err


def _sglang_error(r: httpx.Response, field: str, *words: str) -> None:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert set(err) == {"message"} and err["message"].startswith(field + ":"), err
    assert all(w in err["message"] for w in words), err


def test_text_without_a_tokenizer(teacher):
    """The tiny model's folder has no tokenizer: text is a 422 saying so, on every text route."""
    for path, body, param in [("/v1/completions", {"prompt": "hi", "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", {"messages": CHAT}, "messages"),
                              ("/tokenize", {"prompt": "hi"}, "prompt"),
                              ("/detokenize", {"tokens": [1, 2]}, "tokens")]:
        _vllm_error(_post(teacher, path, body), param, "tokenizer")
    _sglang_error(_post(teacher, "/generate", {"text": "hi"}), "text", "tokenizer")


def test_messages_without_a_chat_template(no_template_teacher):
    _vllm_error(_post(no_template_teacher, "/v1/chat/completions", {"messages": CHAT}), "messages", "chat template")
    _vllm_error(_post(no_template_teacher, "/tokenize", {"messages": CHAT}), "messages", "chat template")
    assert _post(no_template_teacher, "/tokenize", {"prompt": TEXT}).status_code == 200


BAD = [   # path, body (dict or raw bytes), field, words
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", ["wizard"]),
    ("/v1/completions", {"prompt": "word " * 5000, "max_tokens": 1}, "prompt", ["5001 tokens", "4096"]),
    ("/v1/completions", {"prompt": ["ok", "word " * 5000], "max_tokens": 1}, "prompt[1]", ["5001 tokens"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}]}, "messages", ["tokens"]),
    ("/v1/completions", b'{"prompt": ["ok", "\\ud800 x"], "max_tokens": 1}', "prompt[1]", ["surrogate"]),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content",
     ["surrogate"]),
    ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 1}', "body", ["UTF-8"]),
    ("/v1/completions", {"prompt": ["hi", [1, 2]], "max_tokens": 1}, "prompt", ["mixes", "prompt[1] is a list"]),
    ("/v1/completions", {"prompt": [5, "hi"], "max_tokens": 1}, "prompt", ["mixes", "prompt[1] is a text"]),
    ("/v1/completions", {"prompt": "", "max_tokens": 1}, "prompt", ["no tokens"]),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ x }}"}, "chat_template", ["not served"]),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": "required"}, "tool_choice", ["served"]),
    ("/v1/chat/completions", {"messages": CHAT[:2], "continue_final_message": True}, "continue_final_message", []),
    ("/tokenize", {"prompt": [1, 2]}, "prompt", ["text"]),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens[0]", ["outside the vocabulary"]),
]


@pytest.mark.parametrize("path,body,field,words", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_text_input_in_vllm_error_shape(text_teacher, path, body, field, words):
    _vllm_error(_post(text_teacher, path, body), field, *words)


SGLANG_BAD = [
    ({"text": "word " * 5000, "return_logprob": True}, "text", ["5001 tokens"]),
    (b'{"text": ["ok", "\\ud800"]}', "text[1]", ["surrogate"]),
    ({"text": ["ok", 5]}, "text[1]", ["string"]),
    ({"text": "hi", "input_ids": [1, 2]}, "text", ["not both"]),
]


@pytest.mark.parametrize("body,field,words", SGLANG_BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(SGLANG_BAD)])
def test_bad_text_input_in_sglang_error_shape(text_teacher, body, field, words):
    _sglang_error(_post(text_teacher, "/generate", body), field, *words)


def test_still_serving_after_bad_input(text_teacher, hf):
    for path, body, *_ in BAD:
        assert _post(text_teacher, path, body).status_code == 422
    r = _post(text_teacher, "/v1/completions", {"prompt": TEXT, "max_tokens": 1, "prompt_logprobs": 0,
                                                "return_token_ids": True})
    assert r.status_code == 200 and r.json()["choices"][0]["prompt_token_ids"] == hf(TEXT)["input_ids"]
