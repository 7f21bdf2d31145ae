"""vLLM 0.32's POST /v1/chat/completions: chat messages scored and sampled through the one ScoringService.

The messages are rendered with the model's own chat template (text/chat.py, off the event loop) with
vLLM's options (`add_generation_prompt`, default true; `continue_final_message`; `chat_template_kwargs`;
`tools`), then tokenized without special tokens (the template writes them; `add_special_tokens` adds
the tokenizer's on top), as vLLM's renderer does. Before rendering, the messages get what vLLM's parser
gives the template: tool_calls arguments as objects, `developer` turns as `system` where the template
knows no developer role, and tools as vLLM's ChatCompletionToolsParam dumps them.
The prompt ids then make one `Ask` (vllm_core.py): `prompt_logprobs` k scores the rendered chat (top-level
`prompt_logprobs`, decoded tokens as vLLM's); with `echo` and no prompt_logprobs, k = `top_logprobs`.
`prompt_logprobs` with max_tokens (or max_completion_tokens) 1 only scores; otherwise the teacher samples
(until the tokenizer's EOS, a stop id or max_tokens: by default as many as fit, up to OPD_MAX_GENERATE_TOKENS)
and the message content is the decoded sample, `logprobs` + `top_logprobs` in the chat format.

This module does not parse tool calls out of a sample (no tool parser: content stays text), stream,
take a request's own chat template, or serve n > 1.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictBool

from opd_services.errors import InvalidRequest
from opd_services.teacher.service import ScoringService
from opd_services.teacher.surfaces.common import Int, Number, json_response, parse_body, tenant_dependency
from opd_services.teacher.surfaces.dialects.vllm_core import (Answer, Ask, answer, check_model, check_sampling,
                                                              stop_reason, usage, vllm_error)
from opd_services.teacher.surfaces.dialects.vllm_logprobs import chat_logprobs, prompt_logprobs
from opd_services.teacher.surfaces.dialects.vllm_text import decode_answer
from opd_services.teacher.text import chat as chat_text
from opd_services.teacher.text.sequences import check_length
from opd_services.teacher.text.tokenizer import Tokenizer, require, run

ROUTES = {"/v1/chat/completions"}


class ChatRequest(BaseModel):
    """The fields of vLLM's ChatCompletionRequest this surface acts on; others are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    messages: Any
    model: str | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Int | None = 0
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    n: Int | None = 1
    prompt_logprobs: Int | None = None
    temperature: Number | None = None
    seed: Int | None = None
    stop_token_ids: list[Int] | None = None
    stream: StrictBool | None = False
    echo: StrictBool = False
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    return_token_ids: StrictBool | None = None
    return_prompt_text: StrictBool | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    skip_special_tokens: StrictBool = True
    ignore_eos: StrictBool = False


# ---- checking -----------------------------------------------------------------------------------

def _max_tokens(req: ChatRequest) -> tuple[int | None, str]:
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


def check_request(req: ChatRequest, served: str, tok: Tokenizer | None) -> Tokenizer:
    """What vLLM would refuse on /v1/chat/completions, and what we do not serve."""
    check_model(req.model, served)
    tok = require(tok, "messages")
    if req.chat_template is not None:
        raise InvalidRequest("chat_template", "a request's own chat template is not served (vLLM refuses it without "
                                              "--trust-request-chat-template): the model's template renders the "
                                              "messages; remove chat_template")
    top = req.top_logprobs if req.top_logprobs is not None else 0
    if top > 0 and not req.logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs set to true")
    check_tool_choice(req.tools, req.tool_choice)
    mt, mt_field = _max_tokens(req)
    check_sampling(req.n if req.n is not None else 1, mt, top, req.prompt_logprobs, req.stream,
                   logprobs_field="top_logprobs", max_tokens_field=mt_field)
    return tok


def check_tool_choice(tools: list | None, tool_choice: Any) -> None:
    if tools is not None and not tools:
        raise InvalidRequest("tools", "must not be an empty list; give at least one tool or leave tools out")
    if tool_choice not in (None, "none", "auto"):
        raise InvalidRequest("tool_choice", "only 'none' and 'auto' are served: tools are rendered into the prompt, "
                                            "and no tool-call parser turns a sample into tool_calls")
    if tool_choice not in (None, "none") and tools is None:
        raise InvalidRequest("tool_choice", "needs tools")


# ---- rendering the messages (text/chat.py, which applies vLLM's parser first) --------------------

def render_ids(tok: Tokenizer, messages: Any, *, add_generation_prompt: bool, continue_final_message: bool,
               chat_template_kwargs: dict | None, tools: list | None, add_special_tokens: bool,
               max_len: int | None) -> tuple[chat_text.Chat, list[int]]:
    """The rendered chat and its ids as vLLM's renderer gives them (blocks: run it off the loop)."""
    chat = chat_text.render(tok, messages, "messages", add_generation_prompt=add_generation_prompt,
                            continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs,
                            tools=tools, merge_developer=True)
    ids = chat.encoded.ids_L.tolist()
    if add_special_tokens:
        ids = tok.encode(chat.text, "messages", add_special_tokens=True).ids_L.tolist()
    if max_len is not None:
        check_length(len(ids), "messages", max_len, "the rendered chat ")
    return chat, ids


# ---- the ask and the answer ---------------------------------------------------------------------

def _ask(service: ScoringService, req: ChatRequest, tok: Tokenizer, ids: list[int]) -> Ask:
    mt, mt_field = _max_tokens(req)
    room = service.model_info().max_model_len - len(ids)
    default = max(1, min(service.settings.max_generate_tokens, room))
    top = req.top_logprobs or 0
    plp = req.prompt_logprobs if req.prompt_logprobs is not None or not req.echo else top
    eos = () if req.ignore_eos or "eos" not in tok.info.special_ids else (tok.info.special_ids["eos"],)
    return Ask([ids], default if mt is None else mt, plp, top if req.logprobs else None, req.temperature,
               req.stop_token_ids, req.seed, "messages", samples=not (req.prompt_logprobs is not None and mt == 1),
               eos_ids=eos, token_fields=False, max_tokens_field=mt_field, stop_reasons=True)


def _echoed(req: ChatRequest, role: str) -> str:
    """vLLM's echo: the last message's content, when it has the role of the answer."""
    last = chat_text.normalized(req.messages)[-1]
    return (last["content"] or "") if last.get("role") == role else ""


def _response(info, req: ChatRequest, ask: Ask, a: Answer, tok: Tokenizer, prompt_text: str) -> dict:
    """vLLM's ChatCompletionResponse (blocks on the tokenizer: run it off the loop)."""
    d = decode_answer(tok, a, ask.prompt_logprobs, ask.logprobs, skip_special_tokens=req.skip_special_tokens,
                      prompt_text=prompt_text)
    role = "assistant" if req.add_generation_prompt else chat_text.normalized(req.messages)[-1]["role"]
    content = (_echoed(req, role) if req.echo else "") + d.sample_text
    logprobs = None if not req.logprobs else chat_logprobs(d.sample_rows or [], ask.logprobs or 0,
                                                          bool(req.return_tokens_as_token_ids))
    sampled = [] if a.sample is None else a.sample.token_ids_T.tolist()
    choice = {"index": 0, "message": {"role": role, "content": content, "refusal": None, "annotations": None,
                                      "audio": None, "function_call": None, "reasoning": None},
              "logprobs": logprobs, "finish_reason": "length" if a.sample is None else a.sample.finish_reason,
              "stop_reason": stop_reason(ask, a.sample), "token_ids": sampled if req.return_token_ids else None,
              "routed_experts": None}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": info.name, "choices": [choice], "service_tier": None,
            "system_fingerprint": f"opd-{info.engine}-{info.revision.split(':')[-1][:12]}", "usage": usage([a]),
            "prompt_logprobs": prompt_logprobs(d.prompt_rows, ask.prompt_logprobs),
            "prompt_token_ids": list(a.prompt) if req.return_token_ids else None,
            "prompt_text": prompt_text if req.return_prompt_text else None,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


async def _chat(service: ScoringService, request: Request, who) -> dict:
    req = parse_body(await request.body(), ChatRequest)
    info = service.model_info()
    tok = check_request(req, info.name, service.tokenizer)
    chat, ids = await run(render_ids, tok, req.messages, add_generation_prompt=req.add_generation_prompt,
                          continue_final_message=req.continue_final_message,
                          chat_template_kwargs=req.chat_template_kwargs, tools=req.tools,
                          add_special_tokens=req.add_special_tokens, max_len=info.max_model_len)
    ask = _ask(service, req, tok, ids)
    answers = await answer(service, ask, who, logprobs_field="top_logprobs")
    return await run(_response, info, req, ask, answers[0], tok, chat.text)


def mount(app: FastAPI, service: ScoringService) -> None:
    """Add /v1/chat/completions to the native app (same port, same ScoringService)."""
    tenant = tenant_dependency(service)

    @app.post("/v1/chat/completions", tags=["vLLM dialect"])
    async def chat_completions(request: Request):
        """vLLM's /v1/chat/completions: prompt_logprobs over the rendered chat, sampling; see docs/vllm.md."""
        try:
            return json_response(await _chat(service, request, await tenant(request)))
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)
