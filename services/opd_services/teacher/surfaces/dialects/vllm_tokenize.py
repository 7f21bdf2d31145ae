"""vLLM 0.32's POST /tokenize and POST /detokenize, through the model folder's tokenizer (text/).

/tokenize takes a `prompt` (a text: tokenized with `add_special_tokens`, default true) or chat
`messages` (rendered as /v1/chat/completions renders them: `add_generation_prompt` default true,
`continue_final_message`, `chat_template_kwargs`, `tools`; `add_special_tokens` default false) and
answers {"count", "max_model_len", "tokens", "token_strs"} (the vocabulary pieces with
`return_token_strs`, else null), with no length limit, as vLLM. /detokenize takes `tokens` and
answers {"prompt": the decoded text} (special tokens kept). Both run the tokenizer off the event loop.

This module does not score, and it refuses what vLLM would refuse, in vLLM's error shape.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictBool

from opd_services.errors import InvalidRequest
from opd_services.teacher.service import ScoringService, check_vocab
from opd_services.teacher.surfaces.common import Int, json_response, parse_body, tenant_dependency
from opd_services.teacher.surfaces.dialects.vllm_chat import check_tool_choice, render_ids
from opd_services.teacher.surfaces.dialects.vllm_core import check_model, vllm_error
from opd_services.teacher.text.tokenizer import Tokenizer, require, run

ROUTES = {"/tokenize", "/detokenize"}


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest | TokenizeChatRequest, as one model: `prompt` or `messages`."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: Any = None
    messages: Any = None
    add_special_tokens: StrictBool | None = None      # vLLM: true for a prompt, false for messages
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[Int]


def _ids(tok: Tokenizer, req: TokenizeRequest) -> list[int]:
    """The request's token ids (blocks: run it off the loop)."""
    if req.messages is not None:
        _, ids = render_ids(tok, req.messages, add_generation_prompt=req.add_generation_prompt,
                            continue_final_message=req.continue_final_message,
                            chat_template_kwargs=req.chat_template_kwargs, tools=req.tools,
                            add_special_tokens=bool(req.add_special_tokens), max_len=None)
        return ids
    special = True if req.add_special_tokens is None else req.add_special_tokens
    return tok.encode(req.prompt, "prompt", add_special_tokens=special).ids_L.tolist()


def _check_tokenize(req: TokenizeRequest, served: str, tok: Tokenizer | None) -> Tokenizer:
    check_model(req.model, served)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("prompt", "send one of prompt (a text) or messages (a chat)")
    tok = require(tok, "prompt" if req.prompt is not None else "messages")
    if req.prompt is not None and not isinstance(req.prompt, str):
        raise InvalidRequest("prompt", f"must be a text (a string), got {type(req.prompt).__name__}; "
                                       "/tokenize turns text into token ids")
    if req.chat_template is not None:
        raise InvalidRequest("chat_template", "a request's own chat template is not served: the model's template "
                                              "renders the messages; remove chat_template")
    check_tool_choice(req.tools, None)
    return tok


def _tokenized(tok: Tokenizer, req: TokenizeRequest, max_len: int) -> dict:
    ids = _ids(tok, req)
    return {"count": len(ids), "max_model_len": max_len, "tokens": ids,
            "token_strs": tok.token_strs(ids) if req.return_token_strs else None}


def mount(app: FastAPI, service: ScoringService) -> None:
    """Add vLLM's /tokenize and /detokenize to the native app (same port)."""
    tenant = tenant_dependency(service)

    @app.post("/tokenize", tags=["vLLM dialect"])
    async def tokenize(request: Request):
        """vLLM's /tokenize: a prompt or chat messages -> token ids (count, max_model_len, token_strs)."""
        try:
            await tenant(request)
            req = parse_body(await request.body(), TokenizeRequest)
            info = service.model_info()
            tok = _check_tokenize(req, info.name, service.tokenizer)
            return json_response(await run(_tokenized, tok, req, info.max_model_len))
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)

    @app.post("/detokenize", tags=["vLLM dialect"])
    async def detokenize(request: Request):
        """vLLM's /detokenize: token ids -> {"prompt": text}."""
        try:
            await tenant(request)
            req = parse_body(await request.body(), DetokenizeRequest)
            info = service.model_info()
            check_model(req.model, info.name)
            tok = require(service.tokenizer, "tokens")
            check_vocab("tokens", req.tokens, info.vocab_size)
            return json_response({"prompt": await run(tok.decode, req.tokens)})
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)
