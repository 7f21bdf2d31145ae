"""vLLM dialect: the `/v1/completions` prompt-logprobs surface that existing trainers speak.

Routes (on the native HTTP app and port): GET /health, GET /v1/models, POST /v1/completions.
A completions request is parsed into the one ScoringService's ScoreRequest (top_k = k,
rank = True, temperature as asked) and its result rendered field for field as vLLM 0.32 renders
prompt logprobs: `choices[i].prompt_logprobs` = [null, {"<id>": {"logprob", "rank",
"decoded_token"}, ...}, ...] with the actual token first (true rank) then the top-k.
Errors on these routes come in vLLM's shape ({"error": {"message", "type", "param", "code"}})
with the native surface's status codes; the native routes are untouched.

What it does not do: sample (a request that needs sampled tokens gets a 422 saying so until the
teacher sampling engine lands), tokenize (prompts are token ids; decoded_token is null, as vLLM
with --skip-tokenizer-init), or stream. Authentication is the native surface's: `Authorization:
Bearer <experiment key>` (what an OpenAI-style client sends as its api_key) on /v1/models and
/v1/completions; /health stays open, as /healthz is.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from opd_services.errors import InvalidRequest, OPDError
from opd_services.teacher.http import error_status, json_response, _loc_field
from opd_services.teacher.service import ScoreRequest, ScoringService, SequenceIn

ROUTES = {"/health", "/v1/models", "/v1/completions"}
_TYPES = {401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          413: "BadRequestError", 422: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}
NO_SAMPLING = ("sampled completions are not available on this teacher yet (the teacher sampling engine is "
               "being built); it scores prompts only: send max_tokens=1 with prompt_logprobs=k")


class NotFound(InvalidRequest):
    """The `model` asked for is not the one served (vLLM answers 404)."""


class CompletionRequest(BaseModel):
    """The fields of vLLM's CompletionRequest this surface acts on; others are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: list[StrictInt] | list[list[StrictInt]] | str | list[str]
    max_tokens: StrictInt | None = 16
    prompt_logprobs: StrictInt | None = None
    temperature: float | None = None
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool | None = False
    return_token_ids: StrictBool | None = None


def vllm_error(err: Exception) -> Response:
    status, headers = (404, {}) if isinstance(err, NotFound) else error_status(err)
    if isinstance(err, OPDError):
        body = {"message": err.message, "type": _TYPES.get(status, "BadRequestError"),
                "param": getattr(err, "field", None), "code": status}
    else:   # the native mapping logs it with a request id; reuse its message
        from opd_services.teacher.http import error_response
        native = orjson.loads(error_response(err).body)["error"]
        body = {"message": native["message"], "type": "InternalServerError", "param": None, "code": 500}
    return json_response({"error": body}, status, headers)


def _parse(raw: bytes) -> CompletionRequest:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest("body", f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body", "must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidRequest(_loc_field(tuple(first["loc"])).split(".")[0] or "body", first["msg"]) from None


def _check(req: CompletionRequest, served: str) -> list[list[int]]:
    """What vLLM would accept and we can do; returns the prompts as lists of token ids."""
    if req.model is not None and req.model != served:
        raise NotFound("model", f"the model `{req.model}` does not exist; this teacher serves `{served}`")
    if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], str)):
        raise InvalidRequest("prompt", "text prompts need a tokenizer; this teacher scores token ids: send a list "
                                       "of token ids or a list of such lists")
    prompts = [req.prompt] if req.prompt and isinstance(req.prompt[0], int) else req.prompt
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequest("prompt", "must hold at least one non-empty list of token ids")
    if req.echo:
        raise InvalidRequest("echo", "echo needs a tokenizer (it returns the prompt's text); use prompt_logprobs")
    if req.stream or req.n != 1 or req.logprobs is not None or req.prompt_logprobs is None:
        raise InvalidRequest("prompt_logprobs" if req.prompt_logprobs is None else "max_tokens", NO_SAMPLING)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("max_tokens", f"must be at least 1, got {req.max_tokens}")
    if req.max_tokens is None or req.max_tokens > 1:
        raise InvalidRequest("max_tokens", NO_SAMPLING)
    if req.prompt_logprobs < 0:
        raise InvalidRequest("prompt_logprobs", f"must be an integer >= 0 (-1, the whole vocabulary, is not "
                                                f"served), got {req.prompt_logprobs}")
    return prompts


def _field(name: str) -> str:
    """Native field names -> this surface's: sequences[i].token_ids[j] -> prompt[i][j], top_k -> prompt_logprobs."""
    name = re.sub(r"^sequences(\[\d+\])\.token_ids", r"prompt\1", name)
    return {"top_k": "prompt_logprobs", "sequences": "prompt"}.get(name, name)


async def _complete(service: ScoringService, req: CompletionRequest, tenant) -> dict:
    info = service.model_info()
    prompts = _check(req, info.name)
    scored = [i for i, p in enumerate(prompts) if len(p) >= 2]   # one token: nothing to score ([null])
    k = req.prompt_logprobs
    results = {}
    if scored:
        # temperature 0 means greedy sampling to vLLM, which scores prompts unscaled: so do we
        t = 1.0 if req.temperature in (None, 0) else req.temperature
        sreq = ScoreRequest(sequences=[SequenceIn(token_ids=prompts[i]) for i in scored], top_k=k,
                            temperature=t, rank=True)
        try:
            res = await service.score(sreq, tenant)
        except InvalidRequest as e:
            raise InvalidRequest(_field(e.field), e.reason) from None
        results = dict(zip(scored, res.scores))
    choices = [_choice(i, p, results.get(i), k, bool(req.return_token_ids)) for i, p in enumerate(prompts)]
    n_prompt = sum(len(p) for p in prompts)
    return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": info.name, "choices": choices, "service_tier": None,
            "system_fingerprint": f"opd-{info.engine}-{info.revision.split(':')[-1][:12]}",
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt, "completion_tokens": 0,
                      "prompt_tokens_details": None, "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _choice(index: int, prompt: list[int], sc, k: int, token_ids: bool) -> dict:
    plp: list[Any] = [None]
    if sc is not None:
        lps, ranks = sc.logprobs_T.tolist(), sc.rank_T.tolist()
        tops = zip(sc.top_ids_T_K.tolist(), sc.top_logprobs_T_K.tolist()) if k else ((), ) * len(lps)
        for tok, lp, rank, top in zip(prompt[1:], lps, ranks, tops):
            pos = {str(tok): {"logprob": lp, "rank": rank, "decoded_token": None}}
            if k:
                for j, (tid, tlp) in enumerate(zip(*top), 1):
                    key = str(tid)
                    if key not in pos:
                        pos[key] = {"logprob": tlp, "rank": j, "decoded_token": None}
            plp.append(pos)
    return {"index": index, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
            "token_ids": [] if token_ids else None, "prompt_logprobs": plp,
            "prompt_token_ids": list(prompt) if token_ids else None, "routed_experts": None}


def mount(app: FastAPI, service: ScoringService) -> None:
    """Add the vLLM-dialect routes to the native app (same port, same ScoringService)."""

    @app.get("/health", include_in_schema=False)
    async def health():
        return Response(status_code=200 if service.ready else 503)

    async def tenant(request: Request):
        t = await service.authenticate(request.headers.get("authorization"))
        request.state.experiment = t.name
        return t

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
        """vLLM's /v1/completions with prompt_logprobs (scoring only): see README, "Use it from TRL"."""
        try:
            who = await tenant(request)
            req = _parse(await request.body())
            return json_response(await _complete(service, req, who))
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)
