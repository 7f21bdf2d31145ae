"""SGLang dialect: SGLang's native `POST /generate`, what slime and miles send their teacher.

A request (`input_ids` one list, or a list of lists = a batch; or, with the model folder's tokenizer,
`text`: one string or a list = a batch, tokenized as SGLang does, special tokens added) is checked, then:
  - `max_new_tokens: 0` scores only: with `return_logprob`, a ScoreRequest from position
    `logprob_start_len + 1` (our span path: nothing before it goes through the LM head);
  - `max_new_tokens > 0` samples through ScoringService.generate, then (with `return_logprob`)
    scores prompt and completion in one pass for the input and output logprob fields.
Items of a batch that share temperature and `top_logprobs_num` go to the service in one call.
The answer is SGLang's, field for field:
{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens", "input_token_logprobs",
"output_token_logprobs", ["input_top_logprobs", "output_top_logprobs"], ["input_token_ids_logprobs",
"output_token_ids_logprobs"], "completion_tokens", "cached_tokens", "e2e_latency"}}; every logprob entry
is [logprob, token_id, text] and input_token_logprobs covers input_ids[logprob_start_len:] with
entry 0 [null, id, text] (no context scores it), as SGLang pads it. With a tokenizer, `text` is the
decoded output (the stop token that ended it left out, special tokens skipped unless
skip_special_tokens is false), each entry's text is its token decoded alone when
`return_text_in_logprobs` is set (null otherwise), and sampling also stops at the tokenizer's EOS
(`ignore_eos` turns that off), as SGLang does; without one, as SGLang with --skip-tokenizer-init:
`text` input is refused, `text` is "" and entry texts are null (all text work runs off the event loop).
Temperature is applied to the logits before log-softmax, as SGLang does for returned logprobs;
0 means greedy, so raw logits (temperature 1).
Errors come in SGLang's shape, {"error": {"message": "<field>: <reason>"}}, with the shared status
codes (surfaces/common.py). Auth: `Authorization: Bearer <experiment key>`, as on every route.
What it does not do: stream, n > 1, top_p / top_k / min_p truncation, stop strings, LoRA adapters or
multimodal inputs.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictBool

from opd_services.errors import InvalidRequest, OPDError
from opd_services.teacher.service import (GenerateRequest, PromptIn, ScoreRequest, ScoringService, SequenceIn,
                                          check_vocab)
from opd_services.teacher.surfaces.common import (Int, Number, error_response, error_status, json_response, parse_body,
                                                  tenant_dependency)
from opd_services.teacher.text.sequences import encode_prompts
from opd_services.teacher.text.tokenizer import Tokenizer, require, run

ROUTES = {"/generate"}
_REFUSED = {"input_embeds": "input embeddings", "image_data": "images", "video_data": "videos",
            "audio_data": "audio", "lora_path": "LoRA adapters", "lora_id": "LoRA adapters"}


class SamplingParams(BaseModel):
    """The fields of SGLang's sampling_params this surface acts on (SGLang's defaults); others are ignored."""
    model_config = ConfigDict(extra="allow")
    max_new_tokens: Int = 128
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: Int = -1
    min_p: Number = 0.0
    n: Int = 1
    stop_token_ids: list[Int] | None = None
    sampling_seed: Int | None = None
    skip_special_tokens: StrictBool = True
    ignore_eos: StrictBool = False


class GenerateReqInput(BaseModel):
    """The fields of SGLang's GenerateReqInput this surface acts on; others are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    text: Any = None                 # a string or a list of strings (checked below)
    input_ids: list[Int] | list[list[Int]] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    rid: str | list[str] | None = None
    return_logprob: StrictBool | list[StrictBool] | None = None
    logprob_start_len: Int | list[Int] | None = None
    top_logprobs_num: Int | list[Int] | None = None
    token_ids_logprob: list[Int] | list[list[Int]] | None = None
    return_text_in_logprobs: StrictBool = False
    stream: StrictBool = False


@dataclass(frozen=True, slots=True)
class _Item:
    """One checked input of the request, with the options that apply to it."""
    index: int
    ids: list[int]
    rid: str
    sp: SamplingParams
    logprob: bool
    start: int                       # first token of input_ids the input logprob fields cover
    k: int                           # top_logprobs_num
    cands: list[int] | None          # token_ids_logprob
    source: str = "input_ids"        # how errors name this input: "input_ids" or "text"

    @property
    def temperature(self) -> float:   # what scoring divides logits by: 0 (greedy) = raw logits
        return float(self.sp.temperature) or 1.0


def sglang_error(err: Exception) -> Response:
    status, headers = error_status(err)
    message = err.message if isinstance(err, OPDError) else _internal_message(err)
    return json_response({"error": {"message": message}}, status, headers)


def _internal_message(err: Exception) -> str:
    import orjson   # the shared mapping logs it with a request id; reuse its message
    return orjson.loads(error_response(err).body)["error"]["message"]


# ---- checking -----------------------------------------------------------------------------------

def _each(value: Any, n: int, batched: bool, field: str, default: Any, per_item: bool) -> list:
    """A per-request option as one value per item: a list of n (in a batch) or one value for all."""
    if value is None:
        return [default] * n
    if batched and per_item:
        if len(value) != n:
            raise InvalidRequest(field, f"has {len(value)} entries for a batch of {n} inputs; send one per input "
                                        "or a single value")
        return list(value)
    if per_item:
        raise InvalidRequest(field, "a list (one per input) needs a batch: input_ids as a list of lists")
    return [value] * n


def _check_request(req: GenerateReqInput, tok: Tokenizer | None) -> tuple[str, list, bool]:
    """The request's inputs as ("input_ids" | "text", one entry per input, batched), before tokenizing."""
    extra = req.model_extra or {}
    for name, what in _REFUSED.items():
        if extra.get(name) is not None:
            raise InvalidRequest(name, f"{what} are not served by this teacher; send input_ids only")
    if req.text is not None:
        if req.input_ids is not None:
            raise InvalidRequest("text", "send either text or input_ids, not both")
        require(tok, "text")
    if req.stream:
        raise InvalidRequest("stream", "streaming is not served; send stream=false")
    if req.text is not None:
        batched = isinstance(req.text, list)
        if not (isinstance(req.text, str) or (batched and req.text)):
            raise InvalidRequest("text", "must be a string or a non-empty list of strings")
        bad = next((i for i, t in enumerate(req.text) if not isinstance(t, str)), None) if batched else None
        if bad is not None:
            raise InvalidRequest(f"text[{bad}]", f"must be a string, got {type(req.text[bad]).__name__}")
        return "text", req.text if batched else [req.text], batched
    if not req.input_ids:
        raise InvalidRequest("input_ids", "required: a non-empty list of token ids, or a list of such lists")
    batched = isinstance(req.input_ids[0], list)
    return "input_ids", req.input_ids if batched else [req.input_ids], batched


async def _items(req: GenerateReqInput, service: ScoringService) -> tuple[list[_Item], bool]:
    """Checked inputs and whether the request was a batch (a batch is answered with a list)."""
    source, inputs, batched = _check_request(req, service.tokenizer)
    if source == "text":
        fields = [f"text[{i}]" if batched else "text" for i in range(len(inputs))]
        # SGLang's tokenizer(text): special tokens added
        inputs = await run(encode_prompts, service.tokenizer, inputs, fields, add_special_tokens=True,
                           max_len=service.model_info().max_model_len)
    n = len(inputs)
    sps = _each(req.sampling_params, n, batched, "sampling_params", SamplingParams(),
                isinstance(req.sampling_params, list))
    rids = _each(req.rid, n, batched, "rid", None, isinstance(req.rid, list))
    lps = _each(req.return_logprob, n, batched, "return_logprob", False, isinstance(req.return_logprob, list))
    starts = _each(req.logprob_start_len, n, batched, "logprob_start_len", -1, isinstance(req.logprob_start_len, list))
    ks = _each(req.top_logprobs_num, n, batched, "top_logprobs_num", 0, isinstance(req.top_logprobs_num, list))
    ti = req.token_ids_logprob
    cands = _each(ti, n, batched, "token_ids_logprob", None, bool(ti) and isinstance(ti[0], list))
    vocab = service.model_info().vocab_size
    return [_item(i, ids, rids[i], sps[i], lps[i], starts[i], ks[i], cands[i], batched, source, vocab)
            for i, ids in enumerate(inputs)], batched


def _item(i: int, ids: list[int], rid, sp: SamplingParams, logprob: bool, start: int, k: int, cands, batched,
          source: str, vocab: int) -> _Item:
    at = f"[{i}]" if batched else ""
    if not ids:
        raise InvalidRequest(f"input_ids{at}", "needs at least one token id")
    spf = f"sampling_params{at}."
    if sp.max_new_tokens < 0:
        raise InvalidRequest(spf + "max_new_tokens", f"must be an integer >= 0, got {sp.max_new_tokens}")
    if sp.n != 1:
        raise InvalidRequest(spf + "n", f"one output per input (n=1) is served, got {sp.n}; repeat the input")
    if sp.temperature < 0:
        raise InvalidRequest(spf + "temperature", f"must be >= 0 (0 = greedy), got {sp.temperature}")
    if sp.top_p != 1 or sp.top_k not in (-1, 0) or sp.min_p != 0:
        raise InvalidRequest(spf + ("top_p" if sp.top_p != 1 else "top_k" if sp.top_k not in (-1, 0) else "min_p"),
                             "truncated sampling is not served: the teacher samples and scores the full "
                             "distribution (top_p 1, top_k -1, min_p 0)")
    start = len(ids) - 1 if start == -1 else start
    if not 0 <= start < len(ids):
        raise InvalidRequest(f"logprob_start_len{at}", f"must be -1 or in [0, {len(ids) - 1}] for {len(ids)} input "
                                                       f"tokens, got {start}")
    if k < 0:
        raise InvalidRequest(f"top_logprobs_num{at}", f"must be an integer >= 0, got {k}")
    # every id inside the vocabulary, scored or not (max_new_tokens 0 may score none and stop nowhere)
    if source == "input_ids":             # text: the tokenizer's ids are the model's
        check_vocab(f"input_ids{at}", ids, vocab)
    check_vocab(f"token_ids_logprob{at}", cands or [], vocab)
    check_vocab(spf + "stop_token_ids", sp.stop_token_ids or [], vocab)
    return _Item(i, list(ids), rid or uuid.uuid4().hex, sp, bool(logprob), start, k, cands, source)


def _renamer(items: list[_Item], batched: bool):
    """Native field names -> SGLang's, with the item's index in the request (a call may hold a subset)."""
    def rename(e: InvalidRequest) -> InvalidRequest:
        m = re.match(r"^(?:sequences|prompts)\[(\d+)\]\.(token_ids|candidate_ids)(\[\d+\])?(\[\d+\])?(.*)$", e.field)
        if m:
            at = f"[{items[int(m.group(1))].index}]" if batched else ""
            if m.group(2) == "candidate_ids":
                return InvalidRequest(f"token_ids_logprob{at}{m.group(4) or ''}", e.reason)
            it = items[int(m.group(1))]
            if it.source == "text":
                return InvalidRequest(f"text{at}", e.reason)
            return InvalidRequest(f"input_ids{at}{m.group(3) or ''}{m.group(5)}", e.reason)
        at = f"[{items[0].index}]" if batched and len(items) == 1 else ""
        src = items[0].source if items else "input_ids"
        field = {"top_k": "top_logprobs_num", "sequences": src, "prompts": src,
                 "temperature": "sampling_params.temperature", "max_tokens": "sampling_params.max_new_tokens",
                 "seed": "sampling_params.sampling_seed"}.get(e.field, e.field)
        field = re.sub(r"^stop_ids", "sampling_params.stop_token_ids", field)
        return InvalidRequest(field.replace("sampling_params", f"sampling_params{at}", 1), e.reason)
    return rename


# ---- the work -----------------------------------------------------------------------------------

def _groups(items: list[_Item], key) -> list[list[_Item]]:
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return list(out.values())


def _stops(sp: SamplingParams, eos: tuple[int, ...]) -> tuple[int, ...]:
    """stop_token_ids, and (with a tokenizer, unless ignore_eos) the tokenizer's EOS, as SGLang stops."""
    ids = tuple(sp.stop_token_ids or ())
    return ids + tuple(i for i in eos if i not in ids and not sp.ignore_eos)


async def _sample(service: ScoringService, items: list[_Item], tenant, batched: bool) -> dict[int, Any]:
    """item index -> its Sampled, for items with max_new_tokens > 0 (one generate call per parameter set)."""
    tok = service.tokenizer
    eos = () if tok is None or "eos" not in tok.info.special_ids else (tok.info.special_ids["eos"],)
    todo = [it for it in items if it.sp.max_new_tokens]
    key = lambda it: (it.sp.max_new_tokens, float(it.sp.temperature), _stops(it.sp, eos),  # noqa: E731
                      it.sp.sampling_seed)

    async def one(group: list[_Item]):
        sp = group[0].sp
        greq = GenerateRequest(prompts=[PromptIn(token_ids=it.ids) for it in group], max_tokens=sp.max_new_tokens,
                               temperature=float(sp.temperature), stop_ids=_stops(sp, eos),
                               seed=sp.sampling_seed)
        try:
            return zip(group, (await service.generate(greq, tenant)).samples)
        except InvalidRequest as e:
            raise _renamer(group, batched)(e) from None
    done = await asyncio.gather(*(one(g) for g in _groups(todo, key)))
    return {it.index: x for pairs in done for it, x in pairs}


def _sequence(it: _Item, sample) -> SequenceIn | None:
    """What to score for an item: input_ids (+ its completion) from logprob_start_len + 1; None if nothing."""
    out = [] if sample is None else sample.token_ids_T.tolist()
    ids = it.ids + out
    s = min(it.start + 1, len(it.ids))
    if not it.logprob or s >= len(ids):
        return None
    cands = None if not it.cands else [it.cands] * (len(ids) - s)
    return SequenceIn(token_ids=ids, score_from=s, candidate_ids=cands)


async def _score(service: ScoringService, items: list[_Item], samples: dict, tenant, batched: bool) -> dict:
    """item index -> its ItemScores (positions [start + 1, L) of input_ids + completion)."""
    seqs = {it.index: _sequence(it, samples.get(it.index)) for it in items}
    todo = [it for it in items if seqs[it.index] is not None]

    async def one(group: list[_Item]):
        sreq = ScoreRequest(sequences=[seqs[it.index] for it in group], top_k=group[0].k,
                            temperature=group[0].temperature)
        try:
            return zip(group, (await service.score(sreq, tenant)).scores)
        except InvalidRequest as e:
            raise _renamer(group, batched)(e) from None
    done = await asyncio.gather(*(one(g) for g in _groups(todo, lambda it: (it.temperature, it.k))))
    return {it.index: sc for pairs in done for it, sc in pairs}


# ---- the one renderer ---------------------------------------------------------------------------

def _entries(lps: list, ids: list[int], texts: dict | None) -> list:
    return [[lp, t, None if texts is None else texts[t]] for lp, t in zip(lps, ids)]


def _tops(ids_T_K, lps_T_K, texts: dict | None) -> list:
    return [_entries(lps, ids, texts) for ids, lps in zip(ids_T_K.tolist(), lps_T_K.tolist())]


def _logprob_fields(it: _Item, sample, sc, texts: dict | None) -> dict:
    """meta_info's logprob fields: input ones cover input_ids[start:] (entry 0 null), output ones the completion."""
    n_in = len(it.ids) - it.start - 1                 # scored input positions
    lps = [] if sc is None else sc.logprobs_T.tolist()
    out_ids = [] if sample is None else sample.token_ids_T.tolist()
    f = {"input_token_logprobs": _entries([None] + lps[:n_in], it.ids[it.start:], texts),
         "output_token_logprobs": _entries(lps[n_in:], out_ids, texts)}
    if it.k:
        tops = [] if sc is None else _tops(sc.top_ids_T_K, sc.top_logprobs_T_K, texts)
        f["input_top_logprobs"], f["output_top_logprobs"] = [None] + tops[:n_in], tops[n_in:]
    if it.cands:
        rows = [] if sc is None else [_entries(r, it.cands, texts) for r in sc.candidate_logprobs_T_C.tolist()]
        f["input_token_ids_logprobs"], f["output_token_ids_logprobs"] = [None] + rows[:n_in], rows[n_in:]
    return f


def _finish_reason(sample) -> dict:
    if sample is None:
        return {"type": "length", "length": 0}
    if sample.finish_reason == "stop":
        return {"type": "stop", "matched": int(sample.token_ids_T[-1])}
    return {"type": "length", "length": int(sample.token_ids_T.shape[0])}


def _token_texts(tok: Tokenizer, it: _Item, sample, sc) -> dict[int, str]:
    """id -> the token decoded alone, for every id the item's logprob fields show (SGLang's batch_decode)."""
    ids = set(it.ids[it.start:]) | set(it.cands or ())
    if sample is not None:
        ids |= set(sample.token_ids_T.tolist())
    if sc is not None and sc.top_ids_T_K is not None:
        ids |= set(sc.top_ids_T_K.reshape(-1).tolist())
    ids = sorted(ids)
    return dict(zip(ids, tok.token_texts(ids)))


def _output_text(tok: Tokenizer | None, it: _Item, sample) -> str:
    """SGLang's output text: the output ids decoded, the stop token that ended them trimmed."""
    if tok is None or sample is None:
        return ""
    ids = sample.token_ids_T.tolist()
    if sample.finish_reason == "stop":
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=it.sp.skip_special_tokens)


def _render(it: _Item, sample, sc, t0: float, tok: Tokenizer | None = None, with_texts: bool = False) -> dict:
    """One input's answer (with a tokenizer this decodes: run it off the event loop)."""
    out_ids = [] if sample is None else sample.token_ids_T.tolist()
    meta = {"id": it.rid, "finish_reason": _finish_reason(sample), "prompt_tokens": len(it.ids)}
    if it.logprob:
        texts = _token_texts(tok, it, sample, sc) if tok is not None and with_texts else None
        meta.update(_logprob_fields(it, sample, sc, texts))
    meta.update({"completion_tokens": len(out_ids), "cached_tokens": 0, "e2e_latency": time.perf_counter() - t0})
    return {"text": _output_text(tok, it, sample), "output_ids": out_ids, "meta_info": meta}


async def _generate(service: ScoringService, req: GenerateReqInput, tenant) -> Any:
    t0 = time.perf_counter()
    service.model_info()                          # 503 while loading, before any work
    items, batched = await _items(req, service)
    samples = await _sample(service, items, tenant, batched)
    scores = await _score(service, items, samples, tenant, batched)
    tok = service.tokenizer

    def render() -> list:
        return [_render(it, samples.get(it.index), scores.get(it.index), t0, tok, req.return_text_in_logprobs)
                for it in items]
    out = render() if tok is None else await run(render)
    return out if batched else out[0]


def mount(app: FastAPI, service: ScoringService) -> None:
    """Add SGLang's /generate to the native app (same port, same ScoringService). /health is the vLLM dialect's."""
    tenant = tenant_dependency(service)

    @app.post("/generate", tags=["SGLang dialect"])
    async def generate(request: Request):
        """SGLang's native /generate: input logprobs (max_new_tokens 0) and sampling; see docs/dialects.md."""
        try:
            who = await tenant(request)
            req = parse_body(await request.body(), GenerateReqInput)
            return json_response(await _generate(service, req, who))
        except Exception as e:  # this surface's one mapping, in SGLang's error shape
            return sglang_error(e)
