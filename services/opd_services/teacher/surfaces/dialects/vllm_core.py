"""The vLLM dialect's one path into the ScoringService, shared by its routes, and its error shape.

Every vLLM route (/v1/completions, /v1/chat/completions, /inference/v1/generate) parses its body
into one `Ask` (prompts already token ids: text and chat were tokenized before), and `answer`
turns it into ScoreRequests (prompt logprobs: top_k = k, rank = True, temperature as asked) and
GenerateRequests (sampling), then the sampled tokens' scores. Errors of the service name native
fields (sequences[g].token_ids[j], top_k); `renamer` puts them back in the route's terms.
Errors come in vLLM's shape ({"error": {"message", "type", "param", "code"}}) with the shared
status codes (surfaces/common.py).

This module does not tokenize, render responses or know any route's request body.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi.responses import Response

from opd_services.errors import InvalidRequest, OPDError
from opd_services.teacher.service import (GenerateRequest, PromptIn, ScoreRequest, ScoringService, SequenceIn,
                                          check_vocab)
from opd_services.teacher.surfaces.common import error_response, error_status, json_response

_TYPES = {401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          413: "BadRequestError", 422: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}


class NotFound(InvalidRequest):
    """The `model` asked for is not the one served (vLLM answers 404)."""


def vllm_error(err: Exception) -> Response:
    status, headers = (404, {}) if isinstance(err, NotFound) else error_status(err)
    if isinstance(err, OPDError):
        body = {"message": err.message, "type": _TYPES.get(status, "BadRequestError"),
                "param": getattr(err, "field", None), "code": status}
    else:   # the shared mapping logs it with a request id; reuse its message
        native = orjson.loads(error_response(err).body)["error"]
        body = {"message": native["message"], "type": "InternalServerError", "param": None, "code": 500}
    return json_response({"error": body}, status, headers)


@dataclass(frozen=True, slots=True)
class Ask:
    """What a route asks of the service, in vLLM's terms (checked); prompts are token ids."""
    prompts: list[list[int]]
    max_tokens: int | None
    prompt_logprobs: int | None
    logprobs: int | None
    temperature: float | None
    stop_token_ids: list[int] | None
    seed: int | None
    prompt_field: str              # how errors name the prompt: "prompt", "token_ids" or "messages"
    samples: bool = True           # False: only score (nothing is sampled)
    eos_ids: tuple[int, ...] = ()  # also stop there (vLLM's default with a tokenizer), unlike a stop id
    token_fields: bool = True      # errors name prompt[i][j]; False: the prompt as a whole (messages)
    max_tokens_field: str = "max_tokens"
    stop_reasons: bool = False     # report the stop id that ended a sample (with a tokenizer, as vLLM)


@dataclass(frozen=True, slots=True)
class Answer:
    """Per prompt: its prompt scores (or None), its sample (or None), the sample's scores (or None)."""
    prompt: list[int]
    scores: Any
    sample: Any
    sample_scores: Any


def check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise NotFound("model", f"the model `{model}` does not exist; this teacher serves `{served}`")


def check_sampling(n: int, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                   stream: bool | None, prefix: str = "", *, logprobs_field: str = "logprobs",
                   max_tokens_field: str = "max_tokens", min_tokens: int = 1) -> None:
    if stream:
        raise InvalidRequest("stream", "streaming is not served; send stream=false")
    if n != 1:
        raise InvalidRequest(f"{prefix}n", f"one completion per prompt (n=1) is served, got n={n}; repeat the prompt")
    if max_tokens is not None and max_tokens < min_tokens:
        raise InvalidRequest(f"{prefix}{max_tokens_field}", f"must be at least {min_tokens}, got {max_tokens}")
    if logprobs is not None and logprobs < 0:
        raise InvalidRequest(f"{prefix}{logprobs_field}", f"must be an integer >= 0, got {logprobs}")
    if prompt_logprobs is not None and prompt_logprobs < 0:
        raise InvalidRequest(f"{prefix}prompt_logprobs", f"must be an integer >= 0 (-1, the whole vocabulary, "
                                                         f"is not served), got {prompt_logprobs}")


def renamer(ask: Ask, index: list[int], logprobs_field: str = "logprobs"):
    """Native field names -> the route's (sequences[g].token_ids[j] -> prompt[i][j], top_k -> prompt_logprobs)."""
    one = ask.prompt_field != "prompt"
    sp = "sampling_params." if ask.prompt_field == "token_ids" else ""

    def rename(e: InvalidRequest, top_k: str) -> InvalidRequest:
        m = re.match(r"^(?:sequences|prompts)\[(\d+)\]\.token_ids(.*)$", e.field)
        if m:
            field = ask.prompt_field + ("" if one else f"[{index[int(m.group(1))]}]")
            field += m.group(2) if ask.token_fields else ""
        else:
            top = logprobs_field if top_k == "logprobs" else top_k
            field = {"top_k": sp + top, "sequences": ask.prompt_field, "prompts": ask.prompt_field,
                     "temperature": sp + "temperature", "max_tokens": sp + ask.max_tokens_field, "seed": sp + "seed"
                     }.get(e.field, re.sub(r"^stop_ids", sp + "stop_token_ids", e.field))
        return InvalidRequest(field, e.reason)
    return rename


async def _score_prompts(service: ScoringService, ask: Ask, tenant) -> dict:
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
        raise renamer(ask, scored)(e, "prompt_logprobs") from None
    return dict(zip(scored, res.scores))


async def _sample(service: ScoringService, ask: Ask, tenant, rank: bool, logprobs_field: str) -> list:
    """Sampled completions, and with `logprobs` k the teacher's scores of them (unscaled, as vLLM's)."""
    t = 1.0 if ask.temperature is None else ask.temperature
    stops = list(ask.stop_token_ids or ()) + [i for i in ask.eos_ids if i not in (ask.stop_token_ids or ())]
    greq = GenerateRequest(prompts=[PromptIn(token_ids=p) for p in ask.prompts], max_tokens=ask.max_tokens or 16,
                           temperature=t, stop_ids=stops, seed=ask.seed)
    rename = renamer(ask, list(range(len(ask.prompts))), logprobs_field)
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


def _check_ids(service: ScoringService, ask: Ask) -> None:
    """Every id of the ask inside the vocabulary, scored or not: a score-only ask uses no stop id and
    scores no one-token prompt, so the service alone would not see them."""
    vocab = service.model_info().vocab_size
    try:
        for i, p in enumerate(ask.prompts):
            check_vocab(f"prompts[{i}].token_ids", p, vocab)
        check_vocab("stop_ids", ask.stop_token_ids or [], vocab)
    except InvalidRequest as e:
        raise renamer(ask, list(range(len(ask.prompts))))(e, "logprobs") from None


async def answer(service: ScoringService, ask: Ask, tenant, rank: bool = False,
                 logprobs_field: str = "logprobs") -> list[Answer]:
    """Prompt scores, then (unless the ask only scores) samples and their scores, per prompt."""
    _check_ids(service, ask)
    results = await _score_prompts(service, ask, tenant)
    sampled = (await _sample(service, ask, tenant, rank, logprobs_field) if ask.samples
               else [(None, None)] * len(ask.prompts))
    return [Answer(p, results.get(i), *sampled[i]) for i, p in enumerate(ask.prompts)]


def usage(answers: list[Answer]) -> dict:
    n_prompt = sum(len(a.prompt) for a in answers)
    n_done = sum(0 if a.sample is None else int(a.sample.token_ids_T.shape[0]) for a in answers)
    return {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_done, "completion_tokens": n_done,
            "prompt_tokens_details": None, "completion_tokens_details": None}


def stop_reason(ask: Ask, sample) -> int | None:
    """vLLM's stop_reason: the stop_token_ids entry that ended the sample; None for EOS or length."""
    if sample is None or sample.finish_reason != "stop" or not ask.stop_reasons:
        return None      # without a tokenizer, as before: null
    last = int(sample.token_ids_T[-1])
    return None if last in ask.eos_ids else last
