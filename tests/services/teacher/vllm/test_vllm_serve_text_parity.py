"""Our text answers against a real `vllm serve` that loads the same tiny Qwen3 folder WITH its tokenizer:
the same requests (completions text + echo + logprobs, prompt_logprobs k 0 and 3, chat completions with
prompt_logprobs, a greedy chat sample, multibyte / emoji text that splits characters across tokens,
/tokenize, /detokenize) give the same keys, nesting, types, strings and token ids, numbers within 1e-3.

One `vllm serve` for the module (~30-60 s to start on 2 cores), our `text_teacher` (torch engine).
"""
from __future__ import annotations


import httpx
import pytest

from serve_helpers import same_shape, vllm_serve

pytestmark = pytest.mark.vllm

# Values that differ by nature (ids, clocks, fingerprints) on every request:
VOLATILE = {"id", "created", "system_fingerprint"}
# ... and, where we only score (prompt_logprobs with max_tokens 1, echo with max_tokens 0), by design:
# vLLM still samples one token there and we sample none (docs/vllm.md), so the sample's ids, its text
# (completions `text`, chat `message.content`) and the token counts that include it differ.
SCORED_ONLY = {"token_ids", "completion_tokens", "total_tokens", "text", "content"}
# `rank` of the actual token: vLLM counts the tokens whose logprob is >= the actual one's, we count
# 1 + those strictly greater (the engines' definition); they differ by the number of exact float32 ties,
# which a random 151,936-token model has at ranks in the tens of thousands. Held to ours <= vLLM's <= ours + 8.
RANK_TIES = 8

MULTIBYTE = "🦩 ñ😀🦩𓀀 end🫠 x"                   # characters split over 2-3 byte-level tokens
TEXTS = ["Hello there, general Kenobi.", "a🧌b 龘 𝔘𝔫𝔦 ꙮ"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🦩?"},
        {"role": "assistant", "content": "Hello ñ!"}]


@pytest.fixture(scope="module")
def vllm_text_serve(vllm_ok, qwen3_model, tmp_path_factory):
    with vllm_serve(qwen3_model, tmp_path_factory.mktemp("vllm-serve-text"), tokenizer=True) as srv:
        yield srv


def _same(ours, theirs, volatile: set) -> None:
    same_shape(ours, theirs, volatile, rank_ties=RANK_TIES)


def _both(vllm_text_serve, teacher, route: str, body: dict) -> tuple[dict, dict]:
    theirs = httpx.post(vllm_text_serve.url + route, json=body, timeout=120)
    ours = httpx.post(teacher.http_url + route, json=body, timeout=120)
    assert theirs.status_code == ours.status_code == 200, (theirs.text[:500], ours.text[:500])
    return ours.json(), theirs.json()


COMPLETIONS = [   # (body, only scores)
    ({"prompt": MULTIBYTE, "echo": True, "logprobs": 2, "max_tokens": 0}, True),
    ({"prompt": TEXTS[0], "echo": True, "logprobs": 3, "max_tokens": 0, "return_token_ids": True}, True),
    ({"prompt": TEXTS, "max_tokens": 1, "prompt_logprobs": 0, "return_token_ids": True}, True),
    ({"prompt": [MULTIBYTE] + TEXTS, "max_tokens": 1, "prompt_logprobs": 3}, True),
    ({"prompt": MULTIBYTE, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0,
      "return_token_ids": True}, False),
]


def _skip_if_greedy_differs(ours: dict, theirs: dict) -> None:
    a, b = ours["choices"][0]["token_ids"], theirs["choices"][0]["token_ids"]
    if a != b:   # the samples' values only compare when both engines pick the same tokens
        pytest.skip(f"greedy samples differ ({a} vs vLLM's {b}): a near-tie between the engines' float32 logits")


@pytest.mark.parametrize("body,scored_only", COMPLETIONS, ids=[f"completions-{i}" for i in range(len(COMPLETIONS))])
def test_completions_text_as_vllm_serve(vllm_text_serve, text_teacher, qwen3_model, body, scored_only):
    ours, theirs = _both(vllm_text_serve, text_teacher, "/v1/completions", {"model": qwen3_model.name, **body})
    if not scored_only:
        _skip_if_greedy_differs(ours, theirs)
    # echo with max_tokens 0: vLLM's text is the prompt alone, as ours; its one sampled token shows elsewhere
    volatile = (SCORED_ONLY - ({"text"} if body.get("echo") else set())) if scored_only else set()
    _same(ours, theirs, VOLATILE | volatile)


CHATS = [
    {"messages": CHAT, "add_generation_prompt": False, "max_tokens": 1, "prompt_logprobs": 2, "return_token_ids": True},
    {"messages": CHAT[:2], "max_tokens": 1, "prompt_logprobs": 0, "return_prompt_text": True,
     "chat_template_kwargs": {"enable_thinking": False}},
    {"messages": CHAT[:2] + [{"role": "assistant", "content": "sure 🦩"}], "add_generation_prompt": False,
     "continue_final_message": True, "max_tokens": 1, "prompt_logprobs": 1, "return_token_ids": True},
]


@pytest.mark.parametrize("body", CHATS, ids=[f"chat-{i}" for i in range(len(CHATS))])
def test_chat_prompt_logprobs_as_vllm_serve(vllm_text_serve, text_teacher, qwen3_model, body):
    ours, theirs = _both(vllm_text_serve, text_teacher, "/v1/chat/completions", {"model": qwen3_model.name, **body})
    _same(ours, theirs, VOLATILE | SCORED_ONLY)


def test_chat_sample_logprobs_as_vllm_serve(vllm_text_serve, text_teacher, qwen3_model):
    """Greedy on both engines: the same tokens (float32 both), so the chat logprobs compare value for value."""
    body = {"model": qwen3_model.name, "messages": CHAT[:2], "logprobs": True, "top_logprobs": 2, "max_tokens": 3,
            "temperature": 0, "echo": True, "return_token_ids": True}
    ours, theirs = _both(vllm_text_serve, text_teacher, "/v1/chat/completions", body)
    _skip_if_greedy_differs(ours, theirs)
    _same(ours, theirs, VOLATILE)


def test_tokenize_detokenize_as_vllm_serve(vllm_text_serve, text_teacher, qwen3_model):
    m = qwen3_model.name
    for body in [{"model": m, "prompt": MULTIBYTE, "return_token_strs": True},
                 {"model": m, "prompt": TEXTS[1], "add_special_tokens": False},
                 {"model": m, "messages": CHAT},
                 {"model": m, "messages": CHAT, "add_generation_prompt": False, "return_token_strs": True}]:
        ours, theirs = _both(vllm_text_serve, text_teacher, "/tokenize", body)
        _same(ours, theirs, set())
        back = _both(vllm_text_serve, text_teacher, "/detokenize", {"model": m, "tokens": theirs["tokens"]})
        _same(*back, set())
