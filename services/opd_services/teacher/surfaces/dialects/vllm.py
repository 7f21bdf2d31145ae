"""vLLM dialect: the `/v1/completions` prompt-logprobs surface that existing trainers speak.

Routes (on the native HTTP app and port): GET /health, GET /v1/models, POST /v1/completions.
A completions request is parsed into the one ScoringService's ScoreRequest (top_k = k,
rank = True, temperature as asked) and its result rendered field for field as vLLM 0.32 renders
prompt logprobs: `choices[i].prompt_logprobs` = [null, {"<id>": {"logprob", "rank",
"decoded_token"}, ...}, ...] with the actual token first (true rank) then the top-k.
Errors on these routes come in vLLM's shape ({"error": {"message", "type", "param", "code"}})
with the shared status codes (surfaces/common.py); the native routes are untouched.

Sampled completions (max_tokens > 1, or no prompt_logprobs) go through the teacher sampling
engine (ScoringService.generate); `logprobs` k scores the sampled tokens with the teacher's top-k.
A request with prompt_logprobs and max_tokens = 1 only scores (nothing is sampled).
What it does not do: tokenize (prompts are token ids; text is "", tokens are "token_id:N" and
decoded_token is null, as vLLM with --skip-tokenizer-init), stream, or n > 1. Authentication is the native surface's: `Authorization:
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
from opd_services.teacher.service import GenerateRequest, PromptIn, ScoreRequest, ScoringService, SequenceIn
from opd_services.teacher.surfaces.common import error_response, error_status, json_response, loc_field, tenant_dependency

ROUTES = {"/health", "/v1/models", "/v1/completions"}
_TYPES = {401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          413: "BadRequestError", 422: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


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
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None


def vllm_error(err: Exception) -> Response:
    status, headers = (404, {}) if isinstance(err, NotFound) else error_status(err)
    if isinstance(err, OPDError):
        body = {"message": err.message, "type": _TYPES.get(status, "BadRequestError"),
                "param": getattr(err, "field", None), "code": status}
    else:   # the shared mapping logs it with a request id; reuse its message
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
        raise InvalidRequest(loc_field(tuple(first["loc"])).split(".")[0] or "body", first["msg"]) from None


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
    if req.stream:
        raise InvalidRequest("stream", "streaming is not served; send stream=false")
    if req.n != 1:
        raise InvalidRequest("n", f"one completion per prompt (n=1) is served, got n={req.n}; repeat the prompt instead")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("max_tokens", f"must be at least 1, got {req.max_tokens}")
    if req.logprobs is not None and req.logprobs < 0:
        raise InvalidRequest("logprobs", f"must be an integer >= 0, got {req.logprobs}")
    if req.prompt_logprobs is not None and req.prompt_logprobs < 0:
        raise InvalidRequest("prompt_logprobs", f"must be an integer >= 0 (-1, the whole vocabulary, is not "
                                                f"served), got {req.prompt_logprobs}")
    return prompts


def _field(name: str) -> str:
    """Native field names -> this surface's: sequences[i].token_ids[j] -> prompt[i][j], top_k -> prompt_logprobs."""
    name = re.sub(r"^sequences(\[\d+\])\.token_ids", r"prompt\1", name)
    return {"top_k": "prompt_logprobs", "sequences": "prompt"}.get(name, name)


def _samples(req: CompletionRequest) -> bool:
    """vLLM always samples; with prompt_logprobs and max_tokens 1 we only score (a trainer's teacher call)."""
    return req.prompt_logprobs is None or req.max_tokens is None or req.max_tokens > 1


async def _score_prompts(service: ScoringService, req: CompletionRequest, prompts, tenant) -> dict:
    scored = [i for i, p in enumerate(prompts) if len(p) >= 2]   # one token: nothing to score ([null])
    if req.prompt_logprobs is None or not scored:
        return {}
    # temperature 0 means greedy sampling to vLLM, which scores prompts unscaled: so do we
    t = 1.0 if req.temperature in (None, 0) else req.temperature
    sreq = ScoreRequest(sequences=[SequenceIn(token_ids=prompts[i]) for i in scored], top_k=req.prompt_logprobs,
                        temperature=t, rank=True)
    try:
        res = await service.score(sreq, tenant)
    except InvalidRequest as e:
        raise InvalidRequest(_field(e.field), e.reason) from None
    return dict(zip(scored, res.scores))


async def _sample(service: ScoringService, req: CompletionRequest, prompts, tenant) -> list:
    """Sampled completions, and with `logprobs` k the teacher's scores of them (unscaled, as vLLM's)."""
    t = 1.0 if req.temperature is None else req.temperature
    greq = GenerateRequest(prompts=[PromptIn(token_ids=p) for p in prompts], max_tokens=req.max_tokens or 16,
                           temperature=t, stop_ids=req.stop_token_ids or (), seed=req.seed)
    try:
        samples = (await service.generate(greq, tenant)).samples
    except InvalidRequest as e:
        raise InvalidRequest(_field(e.field).replace("prompts", "prompt").replace("stop_ids", "stop_token_ids"),
                             e.reason) from None
    scores = [None] * len(samples)
    if req.logprobs is not None:
        seqs = [SequenceIn(token_ids=list(p) + x.token_ids_T.tolist(), score_from=len(p)) for p, x in zip(prompts, samples)]
        try:
            scores = (await service.score(ScoreRequest(sequences=seqs, top_k=req.logprobs), tenant)).scores
        except InvalidRequest as e:
            raise InvalidRequest("logprobs" if e.field == "top_k" else _field(e.field), e.reason) from None
    return list(zip(samples, scores))


async def _complete(service: ScoringService, req: CompletionRequest, tenant) -> dict:
    info = service.model_info()
    prompts = _check(req, info.name)
    results = await _score_prompts(service, req, prompts, tenant)
    sampled = await _sample(service, req, prompts, tenant) if _samples(req) else [(None, None)] * len(prompts)
    k = req.prompt_logprobs
    choices = [_choice(i, p, results.get(i), k, bool(req.return_token_ids), *sampled[i]) for i, p in enumerate(prompts)]
    n_prompt = sum(len(p) for p in prompts)
    n_done = sum(0 if x is None else int(x.token_ids_T.shape[0]) for x, _ in sampled)
    return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": info.name, "choices": choices, "service_tier": None,
            "system_fingerprint": f"opd-{info.engine}-{info.revision.split(':')[-1][:12]}",
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_done, "completion_tokens": n_done,
                      "prompt_tokens_details": None, "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _completion_logprobs(sample, sc) -> dict:
    """vLLM's CompletionLogProbs for the sampled tokens, tokens named "token_id:N" (no tokenizer)."""
    ids = sample.token_ids_T.tolist()
    tops = ([{f"token_id:{i}": lp for i, lp in zip(ti, tl)} for ti, tl in
             zip(sc.top_ids_T_K.tolist(), sc.top_logprobs_T_K.tolist())] if sc.top_ids_T_K is not None
            else [None] * len(ids))
    return {"text_offset": [0] * len(ids), "token_logprobs": sc.logprobs_T.tolist(),
            "tokens": [f"token_id:{i}" for i in ids], "top_logprobs": tops}


def _choice(index: int, prompt: list[int], sc, k: int | None, token_ids: bool, sample=None, sample_sc=None) -> dict:
    """k: prompt_logprobs as asked (None: not asked, so prompt_logprobs is null)."""
    plp: list[Any] | None = None if k is None else [None]
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
    done = [] if sample is None else sample.token_ids_T.tolist()
    return {"index": index, "text": "", "logprobs": None if sample_sc is None else _completion_logprobs(sample, sample_sc),
            "finish_reason": "length" if sample is None else sample.finish_reason, "stop_reason": None,
            "token_ids": done if token_ids else None, "prompt_logprobs": plp,
            "prompt_token_ids": list(prompt) if token_ids else None, "routed_experts": None}


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
        """vLLM's /v1/completions: prompt_logprobs and sampled completions; see docs/vllm.md."""
        try:
            who = await tenant(request)
            req = _parse(await request.body())
            return json_response(await _complete(service, req, who))
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)
