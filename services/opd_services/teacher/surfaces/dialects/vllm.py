"""vLLM dialect: the two vLLM routes existing trainers speak for teacher logprobs.

Routes (on the native HTTP app and port): GET /health, GET /v1/models, and
  - POST /v1/completions (TRL's VLLMClient, the openai client, ms-swift's GKD teacher): vLLM's
    OpenAI-compatible completions, `choices[i].prompt_logprobs`;
  - POST /inference/v1/generate (prime-rl's `prefill_logprobs`): vLLM 0.32's token-in/token-out
    route, one prompt per request, top-level `prompt_logprobs`, the body of vLLM's
    `GenerateTokensResponse` field for field.
Both parse into one `_Ask` and go through the one ScoringService: prompt logprobs are a
ScoreRequest (top_k = k, rank = True, temperature as asked), and each position renders as vLLM
0.32 does: {"<id>": {"logprob", "rank", "decoded_token"}, ...}, the actual token first with its
true rank, then the top-k. Each response shape has one renderer (`_prompt_logprobs`,
`_completion_logprobs`, `_tokens_logprobs`, `_completion`, `_tokens_response`).
Errors on these routes come in vLLM's shape ({"error": {"message", "type", "param", "code"}})
with the shared status codes (surfaces/common.py); the native routes are untouched.

Sampling (max_tokens > 1, or no prompt_logprobs) goes through the teacher sampling engine
(ScoringService.generate); `logprobs` k scores the sampled tokens with the teacher's top-k.
A request with prompt_logprobs and max_tokens = 1 only scores (nothing is sampled).
What it does not do: tokenize (prompts are token ids; text is "", tokens are "token_id:N" and
decoded_token is null, as vLLM with --skip-tokenizer-init), stream, or n > 1. Authentication is
the native surface's: `Authorization: Bearer <experiment key>` (an OpenAI-style client's api_key)
on /v1/models and both POST routes; /health stays open, as /healthz is.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from opd_services.errors import InvalidRequest, OPDError
from opd_services.teacher.service import GenerateRequest, PromptIn, ScoreRequest, ScoringService, SequenceIn
from opd_services.teacher.surfaces.common import (error_response, error_status, json_response, parse_body,
                                                  tenant_dependency)

ROUTES = {"/health", "/v1/models", "/v1/completions", "/inference/v1/generate"}
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


class TokensSamplingParams(BaseModel):
    """The fields of vLLM's SamplingParams that /inference/v1/generate acts on (vLLM's defaults)."""
    model_config = ConfigDict(extra="allow")
    n: StrictInt = 1
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: StrictInt | None = 0
    min_p: float | None = 0.0
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    prompt_logprobs: StrictInt | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None


class TokensGenerateRequest(BaseModel):
    """vLLM 0.32's GenerateRequest (token-in/token-out), the fields this surface acts on."""
    model_config = ConfigDict(extra="allow")
    request_id: str | None = None
    token_ids: list[StrictInt] = Field(min_length=1)
    sampling_params: TokensSamplingParams
    model: str | None = None
    return_token_ids: StrictBool | None = None
    output_mode: Literal["tokens", "text"] = "tokens"
    stream: StrictBool | None = False
    features: Any = None
    content_parts: Any = None


@dataclass(frozen=True, slots=True)
class _Ask:
    """What either route asks of the service, in vLLM's terms (checked)."""
    prompts: list[list[int]]
    max_tokens: int | None
    prompt_logprobs: int | None
    logprobs: int | None
    temperature: float | None
    stop_token_ids: list[int] | None
    seed: int | None
    prompt_field: str              # how errors name the prompt: "prompt" or "token_ids"


@dataclass(frozen=True, slots=True)
class _Answer:
    """Per prompt: its prompt scores (or None), its sample (or None), the sample's scores (or None)."""
    prompt: list[int]
    scores: Any
    sample: Any
    sample_scores: Any


def vllm_error(err: Exception) -> Response:
    status, headers = (404, {}) if isinstance(err, NotFound) else error_status(err)
    if isinstance(err, OPDError):
        body = {"message": err.message, "type": _TYPES.get(status, "BadRequestError"),
                "param": getattr(err, "field", None), "code": status}
    else:   # the shared mapping logs it with a request id; reuse its message
        native = orjson.loads(error_response(err).body)["error"]
        body = {"message": native["message"], "type": "InternalServerError", "param": None, "code": 500}
    return json_response({"error": body}, status, headers)


# ---- checking -----------------------------------------------------------------------------------

def _check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise NotFound("model", f"the model `{model}` does not exist; this teacher serves `{served}`")


def _check_sampling(n: int, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                    stream: bool | None, prefix: str = "") -> None:
    if stream:
        raise InvalidRequest("stream", "streaming is not served; send stream=false")
    if n != 1:
        raise InvalidRequest(f"{prefix}n", f"one completion per prompt (n=1) is served, got n={n}; repeat the prompt")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{prefix}max_tokens", f"must be at least 1, got {max_tokens}")
    if logprobs is not None and logprobs < 0:
        raise InvalidRequest(f"{prefix}logprobs", f"must be an integer >= 0, got {logprobs}")
    if prompt_logprobs is not None and prompt_logprobs < 0:
        raise InvalidRequest(f"{prefix}prompt_logprobs", f"must be an integer >= 0 (-1, the whole vocabulary, "
                                                         f"is not served), got {prompt_logprobs}")


def _completion_ask(req: CompletionRequest, served: str) -> _Ask:
    """What vLLM would accept on /v1/completions and we can do."""
    _check_model(req.model, served)
    if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], str)):
        raise InvalidRequest("prompt", "text prompts need a tokenizer; this teacher scores token ids: send a list "
                                       "of token ids or a list of such lists")
    prompts = [req.prompt] if req.prompt and isinstance(req.prompt[0], int) else req.prompt
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequest("prompt", "must hold at least one non-empty list of token ids")
    if req.echo:
        raise InvalidRequest("echo", "echo needs a tokenizer (it returns the prompt's text); use prompt_logprobs")
    _check_sampling(req.n, req.max_tokens, req.logprobs, req.prompt_logprobs, req.stream)
    return _Ask(prompts, req.max_tokens, req.prompt_logprobs, req.logprobs, req.temperature, req.stop_token_ids,
                req.seed, "prompt")


def _tokens_ask(req: TokensGenerateRequest, served: str) -> _Ask:
    """What vLLM would accept on /inference/v1/generate and we can do."""
    _check_model(req.model, served)
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
    _check_sampling(sp.n, sp.max_tokens, sp.logprobs, sp.prompt_logprobs, req.stream, "sampling_params.")
    return _Ask([req.token_ids], sp.max_tokens, sp.prompt_logprobs, sp.logprobs, sp.temperature, sp.stop_token_ids,
                sp.seed, "token_ids")


def _renamer(ask: _Ask, index: list[int]):
    """Native field names -> this surface's (sequences[g].token_ids[j] -> prompt[i][j], top_k -> prompt_logprobs)."""
    one = ask.prompt_field == "token_ids"
    sp = "sampling_params." if one else ""

    def rename(e: InvalidRequest, top_k: str) -> InvalidRequest:
        m = re.match(r"^(?:sequences|prompts)\[(\d+)\]\.token_ids(.*)$", e.field)
        if m:
            field = ask.prompt_field + ("" if one else f"[{index[int(m.group(1))]}]") + m.group(2)
        else:
            field = {"top_k": sp + top_k, "sequences": ask.prompt_field, "prompts": ask.prompt_field,
                     "temperature": sp + "temperature", "max_tokens": sp + "max_tokens", "seed": sp + "seed"
                     }.get(e.field, re.sub(r"^stop_ids", sp + "stop_token_ids", e.field))
        return InvalidRequest(field, e.reason)
    return rename


# ---- the work -----------------------------------------------------------------------------------

def _samples(ask: _Ask) -> bool:
    """vLLM always samples; with prompt_logprobs and max_tokens 1 we only score (a trainer's teacher call)."""
    return ask.prompt_logprobs is None or ask.max_tokens is None or ask.max_tokens > 1


async def _score_prompts(service: ScoringService, ask: _Ask, tenant) -> dict:
    scored = [i for i, p in enumerate(ask.prompts) if len(p) >= 2]   # one token: nothing to score ([null])
    if ask.prompt_logprobs is None or not scored:
        return {}
    # temperature 0 means greedy sampling to vLLM, which scores prompts unscaled: so do we
    t = 1.0 if ask.temperature in (None, 0) else ask.temperature
    sreq = ScoreRequest(sequences=[SequenceIn(token_ids=ask.prompts[i]) for i in scored], top_k=ask.prompt_logprobs,
                        temperature=t, rank=True)
    try:
        res = await service.score(sreq, tenant)
    except InvalidRequest as e:
        raise _renamer(ask, scored)(e, "prompt_logprobs") from None
    return dict(zip(scored, res.scores))


async def _sample(service: ScoringService, ask: _Ask, tenant, rank: bool) -> list:
    """Sampled completions, and with `logprobs` k the teacher's scores of them (unscaled, as vLLM's)."""
    t = 1.0 if ask.temperature is None else ask.temperature
    greq = GenerateRequest(prompts=[PromptIn(token_ids=p) for p in ask.prompts], max_tokens=ask.max_tokens or 16,
                           temperature=t, stop_ids=ask.stop_token_ids or (), seed=ask.seed)
    rename = _renamer(ask, list(range(len(ask.prompts))))
    try:
        samples = (await service.generate(greq, tenant)).samples
    except InvalidRequest as e:
        raise rename(e, "logprobs") from None
    scores = [None] * len(samples)
    if ask.logprobs is not None:
        seqs = [SequenceIn(token_ids=list(p) + x.token_ids_T.tolist(), score_from=len(p))
                for p, x in zip(ask.prompts, samples)]
        try:
            scores = (await service.score(ScoreRequest(sequences=seqs, top_k=ask.logprobs, rank=rank), tenant)).scores
        except InvalidRequest as e:
            raise rename(e, "logprobs") from None
    return list(zip(samples, scores))


async def _answer(service: ScoringService, ask: _Ask, tenant, rank: bool = False) -> list[_Answer]:
    results = await _score_prompts(service, ask, tenant)
    sampled = await _sample(service, ask, tenant, rank) if _samples(ask) else [(None, None)] * len(ask.prompts)
    return [_Answer(p, results.get(i), *sampled[i]) for i, p in enumerate(ask.prompts)]


def _usage(answers: list[_Answer]) -> dict:
    n_prompt = sum(len(a.prompt) for a in answers)
    n_done = sum(0 if a.sample is None else int(a.sample.token_ids_T.shape[0]) for a in answers)
    return {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_done, "completion_tokens": n_done,
            "prompt_tokens_details": None, "completion_tokens_details": None}


# ---- renderers, one per shape -------------------------------------------------------------------

def _prompt_logprobs(prompt: list[int], sc, k: int | None) -> list | None:
    """vLLM's prompt_logprobs: [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...], actual token first."""
    if k is None:
        return None
    out: list[Any] = [None]
    if sc is None:
        return out
    lps, ranks = sc.logprobs_T.tolist(), sc.rank_T.tolist()
    if not k:
        out += [{str(tok): {"logprob": lp, "rank": r, "decoded_token": None}}
                for tok, lp, r in zip(prompt[1:], lps, ranks)]
        return out
    for tok, lp, rank, ids, tlps in zip(prompt[1:], lps, ranks, sc.top_ids_T_K.tolist(), sc.top_logprobs_T_K.tolist()):
        pos = {str(tok): {"logprob": lp, "rank": rank, "decoded_token": None}}
        for j, (tid, tlp) in enumerate(zip(ids, tlps), 1):
            pos.setdefault(str(tid), {"logprob": tlp, "rank": j, "decoded_token": None})
        out.append(pos)
    return out


def _completion_logprobs(sample, sc) -> dict:
    """vLLM's CompletionLogProbs for the sampled tokens, tokens named "token_id:N" (no tokenizer)."""
    ids = sample.token_ids_T.tolist()
    tops = ([{f"token_id:{i}": lp for i, lp in zip(ti, tl)} for ti, tl in
             zip(sc.top_ids_T_K.tolist(), sc.top_logprobs_T_K.tolist())] if sc.top_ids_T_K is not None
            else [None] * len(ids))
    return {"text_offset": [0] * len(ids), "token_logprobs": sc.logprobs_T.tolist(),
            "tokens": [f"token_id:{i}" for i in ids], "top_logprobs": tops}


def _tokens_logprobs(sample, sc, k: int) -> dict:
    """vLLM's GenerateLogProbs: per sampled token {token_id, logprob, rank, top_logprobs}, where top_logprobs
    holds the first max(k, 1) entries of [sampled token, then the top-k not already in it], as vLLM orders them."""
    n = len(sc.logprobs_T)
    top_ids = sc.top_ids_T_K.tolist() if k else [[]] * n
    top_lps = sc.top_logprobs_T_K.tolist() if k else [[]] * n
    content = []
    for tok, lp, rank, ids, tlps in zip(sample.token_ids_T.tolist(), sc.logprobs_T.tolist(), sc.rank_T.tolist(),
                                        top_ids, top_lps):
        entries = {tok: {"token_id": tok, "logprob": lp, "rank": rank}}
        for j, (tid, tlp) in enumerate(zip(ids, tlps), 1):
            entries.setdefault(tid, {"token_id": tid, "logprob": tlp, "rank": j})
        content.append({"token_id": tok, "logprob": lp, "rank": rank,
                        "top_logprobs": list(entries.values())[:max(k, 1)]})
    return {"content": content}


def _completion(index: int, a: _Answer, k: int | None, token_ids: bool) -> dict:
    return {"index": index, "text": "",
            "logprobs": None if a.sample_scores is None else _completion_logprobs(a.sample, a.sample_scores),
            "finish_reason": "length" if a.sample is None else a.sample.finish_reason, "stop_reason": None,
            "token_ids": (a.sample.token_ids_T.tolist() if a.sample is not None else []) if token_ids else None,
            "prompt_logprobs": _prompt_logprobs(a.prompt, a.scores, k),
            "prompt_token_ids": list(a.prompt) if token_ids else None, "routed_experts": None}


def _completions_response(info, ask: _Ask, answers: list[_Answer], token_ids: bool) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": info.name, "choices": [_completion(i, a, ask.prompt_logprobs, token_ids)
                                            for i, a in enumerate(answers)],
            "service_tier": None, "system_fingerprint": f"opd-{info.engine}-{info.revision.split(':')[-1][:12]}",
            "usage": _usage(answers),
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _tokens_response(info, req: TokensGenerateRequest, ask: _Ask, a: _Answer) -> dict:
    """vLLM 0.32's GenerateTokensResponse.model_dump(), key for key."""
    choice = {"index": 0, "finish_reason": "length" if a.sample is None else a.sample.finish_reason,
              "stop_reason": None, "token_ids": [] if a.sample is None else a.sample.token_ids_T.tolist(),
              "routed_experts": None, "sampling_mask": None, "weight_versions": None,
              "logprobs": None if a.sample_scores is None else _tokens_logprobs(a.sample, a.sample_scores,
                                                                                 ask.logprobs)}
    return {"request_id": req.request_id or uuid.uuid4().hex, "model": info.name, "created": int(time.time()),
            "usage": _usage([a]), "prompt_logprobs": _prompt_logprobs(a.prompt, a.scores, ask.prompt_logprobs),
            "prompt_token_id_logprobs": None, "prompt_token_ids": list(a.prompt) if req.return_token_ids else None,
            "mm_placeholders": None, "metrics": None, "kv_transfer_params": None, "ec_transfer_params": None,
            "output_mode": "tokens", "choices": [choice]}


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
            req = parse_body(await request.body(), CompletionRequest)
            info = service.model_info()
            ask = _completion_ask(req, info.name)
            answers = await _answer(service, ask, who)
            return json_response(_completions_response(info, ask, answers, bool(req.return_token_ids)))
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
            answers = await _answer(service, ask, who, rank=ask.logprobs is not None)
            return json_response(_tokens_response(info, req, ask, answers[0]))
        except Exception as e:  # this surface's one mapping, in vLLM's error shape
            return vllm_error(e)
