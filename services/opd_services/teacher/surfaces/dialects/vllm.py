"""vLLM dialect: the vLLM 0.32 routes existing trainers and OpenAI clients speak for teacher logprobs.

Routes (on the native HTTP app and port): GET /health, GET /v1/models, and
  - POST /v1/completions (TRL's VLLMClient, the openai client, ms-swift's GKD teacher): token ids or
    (with a tokenizer) text prompts, `prompt_logprobs`, `echo` with `logprobs` in OpenAI's legacy format;
  - POST /v1/chat/completions (vllm_chat.py): chat messages rendered with the model's chat template;
  - POST /tokenize, POST /detokenize (vllm_tokenize.py);
  - POST /inference/v1/generate (prime-rl's `prefill_logprobs`): vLLM 0.32's token-in/token-out route,
    one prompt per request, top-level `prompt_logprobs`, the body of vLLM's `GenerateTokensResponse`.
Each parses into one `Ask` (vllm_core.py) and goes through the one ScoringService: prompt logprobs are a
ScoreRequest (top_k = k, rank = True, temperature as asked), rendered as vLLM 0.32 does (vllm_logprobs.py):
{"<id>": {"logprob", "rank", "decoded_token"}, ...}, the actual token first with its true rank, then the
top-k. With the model folder's tokenizer the answers carry text as `vllm serve` gives it: decoded_token,
tokens named by their text, `text` of samples and echo (vllm_text.py, through text/, off the event loop);
without one, as `vllm serve --skip-tokenizer-init`: text prompts, echo and chat are a 422, decoded_token is
null, tokens are "token_id:N", text is "".
Errors on these routes come in vLLM's shape ({"error": {"message", "type", "param", "code"}}) with the
shared status codes (surfaces/common.py); the native routes are untouched.

Sampling (max_tokens > 1, or no prompt_logprobs) goes through the teacher sampling engine
(ScoringService.generate); `logprobs` k scores the sampled tokens with the teacher's top-k. A request with
prompt_logprobs and max_tokens = 1, or echo with max_tokens = 0, only scores (nothing is sampled). With a
tokenizer a sample also stops at the tokenizer's EOS (vLLM's default; `ignore_eos` turns it off).
What it does not do: stream, n > 1, beam search, stop strings, a request's own chat template. Authentication
is the native surface's: `Authorization: Bearer <experiment key>` (an OpenAI-style client's api_key) on
/v1/models and every POST route; /health stays open, as /healthz is.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from opd_services.errors import InvalidRequest, OPDError
from opd_services.teacher.service import ScoringService
from opd_services.teacher.surfaces.common import Int, Number, json_response, parse_body, tenant_dependency
from opd_services.teacher.surfaces.dialects import vllm_chat, vllm_tokenize
from opd_services.teacher.surfaces.dialects.vllm_core import (Answer, Ask, answer, check_model, check_sampling,
                                                              stop_reason, usage, vllm_error)
from opd_services.teacher.surfaces.dialects.vllm_logprobs import (completion_logprobs, completion_logprobs_ids,
                                                                  positions, prompt_logprobs, tokens_logprobs)
from opd_services.teacher.surfaces.dialects.vllm_text import Decoded, decode_answer
from opd_services.teacher.text.sequences import encode_prompts
from opd_services.teacher.text.tokenizer import Tokenizer, require, run

ROUTES = ({"/health", "/v1/models", "/v1/completions", "/inference/v1/generate"}
          | vllm_chat.ROUTES | vllm_tokenize.ROUTES)


class CompletionRequest(BaseModel):
    """The fields of vLLM's CompletionRequest this surface acts on; others are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: Any                    # a text, a list of texts, token ids, a list of id lists (checked below)
    max_tokens: Int | None = 16
    prompt_logprobs: Int | None = None
    temperature: Number | None = None
    echo: StrictBool | None = False
    logprobs: Int | None = None
    n: Int = 1
    stream: StrictBool | None = False
    return_token_ids: StrictBool | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    stop_token_ids: list[Int] | None = None
    seed: Int | None = None
    add_special_tokens: StrictBool = True
    skip_special_tokens: StrictBool = True
    ignore_eos: StrictBool = False


class TokensSamplingParams(BaseModel):
    """The fields of vLLM's SamplingParams that /inference/v1/generate acts on (vLLM's defaults)."""
    model_config = ConfigDict(extra="allow")
    n: Int = 1
    temperature: Number | None = 1.0
    top_p: Number | None = 1.0
    top_k: Int | None = 0
    min_p: Number | None = 0.0
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    prompt_logprobs: Int | None = None
    stop_token_ids: list[Int] | None = None
    seed: Int | None = None


class TokensGenerateRequest(BaseModel):
    """vLLM 0.32's GenerateRequest (token-in/token-out), the fields this surface acts on."""
    model_config = ConfigDict(extra="allow")
    request_id: str | None = None
    token_ids: list[Int] = Field(min_length=1)
    sampling_params: TokensSamplingParams
    model: str | None = None
    return_token_ids: StrictBool | None = None
    output_mode: Literal["tokens", "text"] = "tokens"
    stream: StrictBool | None = False
    features: Any = None
    content_parts: Any = None


# ---- checking -----------------------------------------------------------------------------------

def _is_id(x) -> bool:
    return type(x) is int


_KINDS = {str: "a text", list: "a list of token ids", int: "a token id"}


def _got(x) -> str:
    return f"the boolean {str(x).lower()}" if isinstance(x, bool) else type(x).__name__


def _prompt_kind(prompt: Any) -> tuple[str, list]:
    """vLLM's four prompt forms as ("text", [texts]) or ("ids", [id lists]); a 422 naming the bad entry."""
    if isinstance(prompt, str):
        return "text", [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt", "must hold at least one non-empty list of token ids (or, with a tokenizer, "
                                       "a text or a list of texts)")
    kinds = [_KINDS.get(type(x)) for x in prompt]
    if None in kinds:
        i = kinds.index(None)
        raise InvalidRequest(f"prompt[{i}]", f"must be a text, a token id or a list of token ids, got "
                                             f"{_got(prompt[i])}")
    if len(set(kinds)) > 1:
        i, j = 0, next(j for j, k in enumerate(kinds) if k != kinds[0])
        raise InvalidRequest("prompt", f"mixes kinds of prompt (prompt[{i}] is {kinds[i]}, prompt[{j}] is "
                                       f"{kinds[j]}); send one list of token ids, a list of such lists, a text or "
                                       "a list of texts")
    if kinds[0] == "a token id":
        return "ids", [prompt]
    if kinds[0] == "a text":
        return "text", list(prompt)
    for i, ids in enumerate(prompt):
        bad = next((j for j, x in enumerate(ids) if not _is_id(x)), None)
        if bad is not None:
            raise InvalidRequest(f"prompt[{i}][{bad}]",
                                 f"must be a token id (an integer), got {_got(ids[bad])}")
    return "ids", list(prompt)


def _completion_ask(req: CompletionRequest, served: str, tok: Tokenizer | None) -> tuple[Ask, str, list]:
    """What vLLM would accept on /v1/completions and we can do: the Ask without prompts yet, and the prompts."""
    check_model(req.model, served)
    kind, prompts = _prompt_kind(req.prompt)
    if kind == "text":
        require(tok, "prompt")
    if kind == "ids" and any(len(p) == 0 for p in prompts):
        raise InvalidRequest("prompt", "must hold at least one non-empty list of token ids")
    if req.echo and tok is None:
        raise InvalidRequest("echo", "echo needs a tokenizer (it returns the prompt's text), and this teacher's model "
                                     "folder has none; use prompt_logprobs")
    echo = bool(req.echo)
    check_sampling(req.n, req.max_tokens, req.logprobs, req.prompt_logprobs, req.stream, min_tokens=0 if echo else 1)
    plp = req.prompt_logprobs if req.prompt_logprobs is not None or not echo else req.logprobs
    only_scores = (req.prompt_logprobs is not None and req.max_tokens == 1) or (echo and req.max_tokens == 0)
    eos = () if tok is None or req.ignore_eos or "eos" not in tok.info.special_ids else (tok.info.special_ids["eos"],)
    ask = Ask([], req.max_tokens, plp, req.logprobs, req.temperature, req.stop_token_ids, req.seed, "prompt",
              samples=not only_scores, eos_ids=eos, stop_reasons=tok is not None)
    return ask, kind, prompts


async def _tokenized(ask: Ask, kind: str, prompts: list, tok: Tokenizer | None, req: CompletionRequest,
                     max_len: int) -> Ask:
    if kind == "ids":
        return _with_prompts(ask, prompts)
    fields = ["prompt"] if isinstance(req.prompt, str) else [f"prompt[{i}]" for i in range(len(prompts))]
    ids = await run(encode_prompts, tok, prompts, fields, add_special_tokens=req.add_special_tokens, max_len=max_len)
    return _with_prompts(ask, ids)


def _with_prompts(ask: Ask, prompts: list[list[int]]) -> Ask:
    return dataclasses.replace(ask, prompts=prompts)


def _tokens_ask(req: TokensGenerateRequest, served: str) -> Ask:
    """What vLLM would accept on /inference/v1/generate and we can do."""
    check_model(req.model, served)
    sp = req.sampling_params
    if req.output_mode != "tokens":
        raise InvalidRequest("output_mode", "'text' needs a tokenizer; this teacher serves output_mode 'tokens'")
    if req.features is not None or req.content_parts is not None:
        raise InvalidRequest("features" if req.features is not None else "content_parts",
                             "multimodal inputs are not served; send token_ids only")
    if any(t < 0 for t in req.token_ids):
        raise InvalidRequest("token_ids", "token_ids must not contain negative values")
    if (sp.top_p not in (None, 1.0) or sp.top_k not in (None, 0, -1) or sp.min_p not in (None, 0.0)):
        raise InvalidRequest("sampling_params", "top_p, top_k and min_p are not served: the teacher samples and "
                                                "scores the full distribution (top_p 1, top_k 0, min_p 0)")
    check_sampling(sp.n, sp.max_tokens, sp.logprobs, sp.prompt_logprobs, req.stream, "sampling_params.")
    samples = sp.prompt_logprobs is None or sp.max_tokens is None or sp.max_tokens > 1
    return Ask([req.token_ids], sp.max_tokens, sp.prompt_logprobs, sp.logprobs, sp.temperature, sp.stop_token_ids,
               sp.seed, "token_ids", samples=samples)


# ---- renderers, one per shape -------------------------------------------------------------------

def _legacy_logprobs(a: Answer, d: Decoded, req: CompletionRequest) -> dict | None:
    """OpenAI's legacy logprobs with a tokenizer: the sample's tokens, or with echo the prompt's first."""
    if req.logprobs is None:
        return None
    sample_ids = [] if a.sample is None else a.sample.token_ids_T.tolist()
    sample_rows = d.sample_rows or []
    if req.echo:
        ids, rows = a.prompt + sample_ids, [None] + (d.prompt_rows or []) + sample_rows
    else:
        ids, rows = sample_ids, sample_rows
    return completion_logprobs(ids, rows, req.logprobs, d.first_text, bool(req.return_tokens_as_token_ids))


def _completion(index: int, a: Answer, d: Decoded, ask: Ask, req: CompletionRequest, named: bool) -> dict:
    token_ids = bool(req.return_token_ids)
    if named:
        echo = "" if not req.echo or token_ids else d.prompt_text
        text, logprobs = echo + d.sample_text, _legacy_logprobs(a, d, req)
    else:
        text = ""
        logprobs = None if a.sample_scores is None else completion_logprobs_ids(a.sample, a.sample_scores)
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": "length" if a.sample is None else a.sample.finish_reason,
            "stop_reason": stop_reason(ask, a.sample),
            "token_ids": (a.sample.token_ids_T.tolist() if a.sample is not None else []) if token_ids else None,
            "prompt_logprobs": prompt_logprobs(d.prompt_rows, ask.prompt_logprobs),
            "prompt_token_ids": list(a.prompt) if token_ids else None, "routed_experts": None}


def _fingerprint(info) -> str:
    return f"opd-{info.engine}-{info.revision.split(':')[-1][:12]}"


def _completions_response(info, ask: Ask, answers: list[Answer], req: CompletionRequest, tok: Tokenizer | None,
                          texts: list[str] | None) -> dict:
    """vLLM's CompletionResponse; blocks on the tokenizer when there is one (run it off the loop)."""
    def echoed(i: int) -> str | None:    # None: decode the prompt ids (echo of an id prompt)
        return "" if not req.echo else None if texts is None else texts[i]
    decoded = [decode_answer(tok, a, ask.prompt_logprobs, ask.logprobs, skip_special_tokens=req.skip_special_tokens,
                             prompt_text=echoed(i)) for i, a in enumerate(answers)]
    return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": info.name, "choices": [_completion(i, a, d, ask, req, tok is not None)
                                            for i, (a, d) in enumerate(zip(answers, decoded))],
            "service_tier": None, "system_fingerprint": _fingerprint(info), "usage": usage(answers),
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _tokens_response(info, req: TokensGenerateRequest, ask: Ask, a: Answer) -> dict:
    """vLLM 0.32's GenerateTokensResponse.model_dump(), key for key."""
    choice = {"index": 0, "finish_reason": "length" if a.sample is None else a.sample.finish_reason,
              "stop_reason": None, "token_ids": [] if a.sample is None else a.sample.token_ids_T.tolist(),
              "routed_experts": None, "sampling_mask": None, "weight_versions": None,
              "logprobs": None if a.sample_scores is None else tokens_logprobs(a.sample, a.sample_scores,
                                                                                ask.logprobs)}
    rows = None if a.scores is None else positions(a.prompt[1:], a.scores, ask.prompt_logprobs or 0)
    return {"request_id": req.request_id or uuid.uuid4().hex, "model": info.name, "created": int(time.time()),
            "usage": usage([a]), "prompt_logprobs": prompt_logprobs(rows, ask.prompt_logprobs),
            "prompt_token_id_logprobs": None, "prompt_token_ids": list(a.prompt) if req.return_token_ids else None,
            "mm_placeholders": None, "metrics": None, "kv_transfer_params": None, "ec_transfer_params": None,
            "output_mode": "tokens", "choices": [choice]}


# ---- routes -------------------------------------------------------------------------------------

async def _complete(service: ScoringService, request: Request, who) -> dict:
    req = parse_body(await request.body(), CompletionRequest)
    info, tok = service.model_info(), service.tokenizer
    ask, kind, prompts = _completion_ask(req, info.name, tok)
    ask = await _tokenized(ask, kind, prompts, tok, req, info.max_model_len)
    answers = await answer(service, ask, who)
    if tok is None:
        return _completions_response(info, ask, answers, req, None, None)
    texts = prompts if kind == "text" else None
    return await run(_completions_response, info, ask, answers, req, tok, texts)


def mount(app: FastAPI, service: ScoringService) -> None:
    """Add the vLLM-dialect routes to the native app (same port, same ScoringService)."""

    @app.get("/health", include_in_schema=False)
    async def health():
        return Response(status_code=200 if service.ready else 503)

    tenant = tenant_dependency(service)

    @app.get("/v1/models", tags=["vLLM dialect"])
    async def models(request: Request):
        try:
            await tenant(request)
            info = service.model_info()
        except OPDError as e:
            return vllm_error(e)
        card = {"id": info.name, "object": "model", "created": int(time.time()), "owned_by": "opd",
                "root": info.name, "parent": None, "max_model_len": info.max_model_len, "permission": []}
        return json_response({"object": "list", "data": [card]})

    @app.post("/v1/completions", tags=["vLLM dialect"])
    async def completions(request: Request):
        """vLLM's /v1/completions: prompt_logprobs, echo, text prompts and sampled completions; see docs/vllm.md."""
        try:
            return json_response(await _complete(service, request, await tenant(request)))
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)

    @app.post("/inference/v1/generate", tags=["vLLM dialect"])
    async def tokens_generate(request: Request):
        """vLLM's token-in/token-out /inference/v1/generate (prime-rl): prompt_logprobs, sampling; see docs/vllm.md."""
        try:
            who = await tenant(request)
            req = parse_body(await request.body(), TokensGenerateRequest)
            info = service.model_info()
            ask = _tokens_ask(req, info.name)
            answers = await answer(service, ask, who, rank=ask.logprobs is not None)
            return json_response(_tokens_response(info, req, ask, answers[0]))
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)

    vllm_chat.mount(app, service)
    vllm_tokenize.mount(app, service)
