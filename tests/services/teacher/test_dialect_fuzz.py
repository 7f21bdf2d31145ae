"""Property-based fuzz of the dialect routes (hypothesis, bounded): whatever the body, the answer is
200 or that protocol's own error shape naming a field, never a 500.

Bodies are valid requests of each route, kept or with one field (top level or in sampling_params)
set to arbitrary JSON (wrong types, negative or huge numbers, nested junk), dropped, or joined by an
unknown key; plus raw non-JSON bytes.
Runs against the session's torch teacher (tiny model, vocabulary 128), and the text routes (text
prompts, chat messages, /tokenize, /detokenize, SGLang `text`) against the tiny Qwen3 with its real
tokenizer (`text_teacher`); ~350 requests in all.
"""
from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.integers(-2**70, 2**70),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
junk = st.recursive(scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
tok = st.integers(0, 127)
ids = st.lists(tok, min_size=1, max_size=12)
temperature = st.sampled_from([0, 0.5, 1.0])

# Valid bodies (every field plausible), then `mutated` breaks at most one thing in them.
SGLANG = st.fixed_dictionaries(
    {"input_ids": st.one_of(ids, st.lists(ids, min_size=1, max_size=3)),
     "sampling_params": st.fixed_dictionaries({"max_new_tokens": st.integers(0, 3)}, optional={
         "temperature": temperature, "stop_token_ids": st.lists(tok, max_size=2), "skip_special_tokens": st.booleans()}),
     "return_logprob": st.booleans()},
    optional={"logprob_start_len": st.integers(-1, 4), "top_logprobs_num": st.integers(0, 5),
              "token_ids_logprob": st.lists(tok, min_size=1, max_size=3), "rid": st.text(max_size=4)})

VLLM_TOKENS = st.fixed_dictionaries(
    {"token_ids": ids, "sampling_params": st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(1, 3), "temperature": temperature, "prompt_logprobs": st.integers(0, 5),
        "logprobs": st.integers(0, 3), "stop_token_ids": st.lists(tok, max_size=2), "seed": st.integers(0, 2**32)})},
    optional={"request_id": st.text(max_size=4), "return_token_ids": st.booleans()})

VLLM_COMPLETIONS = st.fixed_dictionaries(
    {"prompt": st.one_of(ids, st.lists(ids, min_size=1, max_size=3))},
    optional={"max_tokens": st.integers(1, 3), "prompt_logprobs": st.integers(0, 5), "logprobs": st.integers(0, 3),
              "temperature": temperature, "return_token_ids": st.booleans(), "stop_token_ids": st.lists(tok, max_size=2)})


@st.composite
def mutated(draw, valid, keep: frozenset = frozenset()):
    """A valid body, kept, or with one field (top level or inside sampling_params) set to junk, or dropped;
    fields in `keep` stay valid (chat's max_tokens: without it the teacher samples up to 1024 tokens)."""
    body = draw(valid)
    how = draw(st.sampled_from(["keep", "junk", "junk", "junk", "drop", "unknown"]))
    target = body
    if isinstance(body.get("sampling_params"), dict) and body["sampling_params"] and draw(st.booleans()):
        target = body["sampling_params"]
    key = draw(st.sampled_from(sorted(set(target) - keep) or sorted(target)))
    if how == "junk":
        target[key] = draw(junk)
    elif how == "drop":
        del target[key]
    elif how == "unknown":
        target["zz_unknown"] = draw(junk)
    return body


def sglang_error_ok(body) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"message"} and ": " in body["error"]["message"]


def vllm_error_ok(body) -> bool:
    err = body.get("error", {})
    return set(body) == {"error"} and set(err) == {"message", "type", "param", "code"} and bool(err["param"])


words = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
role = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
messages = st.lists(st.fixed_dictionaries({"role": role, "content": words}), min_size=1, max_size=3)
TEXT_COMPLETIONS = st.fixed_dictionaries(
    {"prompt": st.one_of(words, st.lists(words, min_size=1, max_size=3))},
    optional={"max_tokens": st.integers(0, 3), "prompt_logprobs": st.integers(0, 5), "logprobs": st.integers(0, 3),
              "echo": st.booleans(), "temperature": temperature, "add_special_tokens": st.booleans(),
              "return_token_ids": st.booleans()})
CHAT = st.fixed_dictionaries(
    {"messages": messages, "max_tokens": st.integers(1, 3)},
    optional={"prompt_logprobs": st.integers(0, 5), "logprobs": st.booleans(),
              "top_logprobs": st.integers(0, 3), "echo": st.booleans(), "add_generation_prompt": st.booleans(),
              "continue_final_message": st.booleans(), "temperature": temperature,
              "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()})})
TOKENIZE = st.one_of(st.fixed_dictionaries({"prompt": words}, optional={"return_token_strs": st.booleans(),
                                                                        "add_special_tokens": st.booleans()}),
                     st.fixed_dictionaries({"messages": messages}, optional={"add_generation_prompt": st.booleans()}))
DETOKENIZE = st.fixed_dictionaries({"tokens": st.lists(st.integers(0, 151_935), max_size=8)})
SGLANG_TEXT = st.fixed_dictionaries(
    {"text": st.one_of(words, st.lists(words, min_size=1, max_size=3)),
     "sampling_params": st.fixed_dictionaries({"max_new_tokens": st.integers(0, 2)}), "return_logprob": st.booleans()},
    optional={"logprob_start_len": st.integers(-1, 3), "top_logprobs_num": st.integers(0, 3),
              "return_text_in_logprobs": st.booleans()})

ROUTES = {"/generate": (mutated(SGLANG), sglang_error_ok),
          "/inference/v1/generate": (mutated(VLLM_TOKENS), vllm_error_ok),
          "/v1/completions": (mutated(VLLM_COMPLETIONS), vllm_error_ok)}


TEXT_ROUTES = {"/v1/completions": (mutated(TEXT_COMPLETIONS), vllm_error_ok),
               "/v1/chat/completions": (mutated(CHAT, frozenset({"max_tokens"})), vllm_error_ok),
               "/tokenize": (mutated(TOKENIZE), vllm_error_ok), "/detokenize": (mutated(DETOKENIZE), vllm_error_ok),
               "/generate": (mutated(SGLANG_TEXT), sglang_error_ok)}
TEXT_SETTINGS = settings(SETTINGS, max_examples=25)


@pytest.fixture(scope="module")
def http(teacher):
    with httpx.Client(base_url=teacher.http_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def text_http(text_teacher):
    with httpx.Client(base_url=text_teacher.http_url, timeout=60) as c:
        yield c


def _check(http, route: str, r: httpx.Response, routes=ROUTES) -> None:
    assert r.status_code in (200, 404, 413, 422), (route, r.status_code, r.text[:500])
    body = r.json()
    if r.status_code != 200:
        assert routes[route][1](body), (route, body)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzz_bodies_get_the_protocols_answer(http, route):
    @SETTINGS
    @given(body=ROUTES[route][0])
    def run(body):
        _check(http, route, http.post(route, json=body))
    run()


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzz_raw_bytes(http, route):
    @settings(max_examples=15, deadline=None, derandomize=True)
    @given(raw=st.binary(max_size=40) | junk.map(lambda v: httpx.Request("POST", "/", json=v).content))
    def run(raw):
        _check(http, route, http.post(route, content=raw, headers={"content-type": "application/json"}))
    run()


@pytest.mark.parametrize("route", sorted(TEXT_ROUTES))
def test_fuzz_text_bodies_get_the_protocols_answer(text_http, route):
    @TEXT_SETTINGS
    @given(body=TEXT_ROUTES[route][0])
    def run(body):
        _check(text_http, route, text_http.post(route, json=body), TEXT_ROUTES)
    run()
