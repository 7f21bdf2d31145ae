"""Client-side encoding of score and generate requests and decoding of responses, for HTTP JSON and gRPC.

The server's side of the same contract lives in `opd_services.teacher.surfaces.protocol`; a test
holds the two to the same numbers. Nothing here does I/O.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client.types import (GenerateResponse, GenerateUsage, Generation, ModelInfo, ScoreResponse, Sequence,
                              SequenceScores, TokenizerInfo, Usage, check_unicode)

SequenceLike = Sequence | Iterable[int]


def as_sequences(sequences: Iterable[SequenceLike]) -> list[Sequence]:
    """Accept Sequence objects or bare token-id lists (scored from position 1); text that is not valid
    Unicode (a lone surrogate) is refused here, naming the field, as the teacher would refuse it."""
    out = []
    for i, s in enumerate(sequences):
        s = s if isinstance(s, Sequence) else Sequence(token_ids=list(s))
        if isinstance(s.text, str):
            check_unicode(s.text, f"sequences[{i}].text")
        for j, m in enumerate(s.messages or ()):
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                check_unicode(m["content"], f"sequences[{i}].messages[{j}].content")
        out.append(s)
    return out


def _ids(a) -> list[int]:
    return np.asarray(a, dtype=np.int64).reshape(-1).tolist()


# ---- HTTP JSON -------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreOptions:
    """The per-request options of a score call, as both transports send them."""
    top_k: int = 0
    temperature: float = 1.0
    entropy: bool = False
    chat_template_kwargs: dict | None = None
    add_special_tokens: bool = True


def _sequence_json(s: Sequence) -> dict:
    d: dict = {}
    if s.text is not None:
        d["text"] = s.text
        if s.score_from_char is not None:
            d["score_from_char"] = int(s.score_from_char)
    elif s.messages is not None:
        d["messages"] = list(s.messages)
    else:
        d = {"token_ids": _ids(s.token_ids), "score_from": int(s.score_from)}
    if s.id:
        d["id"] = s.id
    if s.candidate_ids_T_C is not None:
        d["candidate_ids"] = np.asarray(s.candidate_ids_T_C, dtype=np.int64).tolist()
    return d


def request_json(seqs: list[Sequence], opts: ScoreOptions, teacher: str = "") -> dict:
    body = {"top_k": opts.top_k, "temperature": opts.temperature, "entropy": opts.entropy,
            "sequences": [_sequence_json(s) for s in seqs]}
    if opts.chat_template_kwargs is not None:
        body["chat_template_kwargs"] = opts.chat_template_kwargs
    if not opts.add_special_tokens:
        body["add_special_tokens"] = False
    if teacher:
        body["teacher"] = teacher
    return body


def model_from_json(d: dict) -> ModelInfo:
    fields = {k: d[k] for k in ModelInfo.__dataclass_fields__ if k in d}
    if fields.get("tokenizer") is not None:
        t = fields["tokenizer"]
        fields["tokenizer"] = TokenizerInfo(**{k: t[k] for k in TokenizerInfo.__dataclass_fields__ if k in t})
    return ModelInfo(**fields)


def _text_fields_json(r: dict) -> dict:
    """What a text / messages sequence's result adds: the ids scored and where they came from."""
    if r.get("token_ids") is None:
        return {}
    spans = r.get("message_spans")
    return {"token_ids_L": np.asarray(r["token_ids"], dtype=np.int64), "score_from": int(r["score_from"]),
            "offsets_T_2": np.asarray(r["offsets"], dtype=np.int64).reshape(-1, 2), "text": r.get("text"),
            "message_spans_M_2": None if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2)}


def _f32(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float32)


def response_from_json(d: dict) -> ScoreResponse:
    results = []
    for r in d["results"]:
        top_ids = r.get("top_ids")
        results.append(SequenceScores(
            id=r.get("id", ""),
            logprobs_T=np.asarray(r["logprobs"], dtype=np.float32),
            top_ids_T_K=None if top_ids is None else np.asarray(top_ids, dtype=np.int64),
            top_logprobs_T_K=_f32(r.get("top_logprobs")),
            candidate_logprobs_T_C=_f32(r.get("candidate_logprobs")),
            entropy_T=_f32(r.get("entropy")),
            **_text_fields_json(r),
        ))
    u = d.get("usage", {})
    return ScoreResponse(model=model_from_json(d["model"]), results=results,
                         usage=Usage(u.get("scored_tokens", 0), u.get("total_tokens", 0)),
                         top_k=int(d.get("top_k", 0)))


# ---- gRPC --------------------------------------------------------------------------------

def _message_proto(m: dict) -> pb.ChatMessage:
    extra = {k: v for k, v in m.items() if k not in ("role", "content", "score")}
    out = pb.ChatMessage(role=str(m.get("role", "")), content=m.get("content") or "",
                         extra_json=json.dumps(extra) if extra else "")
    if m.get("score") is not None:
        out.score = bool(m["score"])
    return out


def _sequence_proto(s: Sequence) -> pb.Sequence:
    if s.text is not None:
        m = pb.Sequence(id=s.id, text=s.text)
        if s.score_from_char is not None:
            m.score_from_char = int(s.score_from_char)
    elif s.messages is not None:
        m = pb.Sequence(id=s.id, messages=[_message_proto(x) for x in s.messages])
    else:
        m = pb.Sequence(id=s.id, token_ids=_ids(s.token_ids), score_from=int(s.score_from))
    return m


def request_proto(seqs: list[Sequence], opts: ScoreOptions, teacher: str = "") -> pb.ScoreRequest:
    msgs = []
    for s in seqs:
        m = _sequence_proto(s)
        if s.candidate_ids_T_C is not None:
            c = np.asarray(s.candidate_ids_T_C, dtype=np.int64)
            if c.ndim != 2:
                raise ValueError("candidate_ids_T_C must be 2-D: one row per scored position")
            m.candidate_ids.extend(c.reshape(-1).tolist())
            m.candidate_width = c.shape[1]
        msgs.append(m)
    req = pb.ScoreRequest(sequences=msgs, top_k=opts.top_k, temperature=opts.temperature, entropy=opts.entropy,
                          teacher=teacher)
    if opts.chat_template_kwargs is not None:
        req.chat_template_kwargs_json = json.dumps(opts.chat_template_kwargs)
    if not opts.add_special_tokens:
        req.add_special_tokens = False
    return req


def model_from_proto(m: pb.ModelInfo) -> ModelInfo:
    tok = None
    if m.HasField("tokenizer"):
        t = m.tokenizer
        tok = TokenizerInfo(name=t.name, vocab_size=t.vocab_size, special_ids=dict(t.special_ids),
                            files_sha256=t.files_sha256, chat_template_sha256=t.chat_template_sha256)
    return ModelInfo(name=m.name, engine=m.engine, engine_version=m.engine_version, dtype=m.dtype,
                     revision=m.revision, vocab_size=m.vocab_size, max_model_len=m.max_model_len,
                     max_top_k=m.max_top_k, teacher=m.teacher, tokenizer=tok)


def _text_fields_proto(r: pb.SequenceResult) -> dict:
    if not len(r.token_ids):
        return {}
    spans = np.array(r.message_spans, dtype=np.int64).reshape(-1, 2) if len(r.message_spans) else None
    return {"token_ids_L": np.array(r.token_ids, dtype=np.int64), "score_from": int(r.score_from),
            "offsets_T_2": np.array(r.offsets, dtype=np.int64).reshape(-1, 2),
            "text": r.text if spans is not None else None, "message_spans_M_2": spans}


def response_from_proto(resp: pb.ScoreResponse) -> ScoreResponse:
    k = resp.top_k
    results = []
    for r in resp.results:
        lp = np.array(r.logprobs, dtype=np.float32)
        t = lp.shape[0]
        top_ids = top_lp = cand = ent = None
        if k > 0:
            top_ids = np.array(r.top_ids, dtype=np.int64).reshape(t, k)
            top_lp = np.array(r.top_logprobs, dtype=np.float32).reshape(t, k)
        if r.candidate_width > 0:
            cand = np.array(r.candidate_logprobs, dtype=np.float32).reshape(t, r.candidate_width)
        if len(r.entropy):
            ent = np.array(r.entropy, dtype=np.float32)
        results.append(SequenceScores(id=r.id, logprobs_T=lp, top_ids_T_K=top_ids,
                                      top_logprobs_T_K=top_lp, candidate_logprobs_T_C=cand,
                                      entropy_T=ent, **_text_fields_proto(r)))
    return ScoreResponse(model=model_from_proto(resp.model), results=results,
                         usage=Usage(resp.usage.scored_tokens, resp.usage.total_tokens), top_k=k)


# ---- generation (both transports) ---------------------------------------------------------

def as_prompts(prompts) -> list[tuple[str, list[int]]]:
    """Accept bare token-id lists / arrays, or (id, token_ids) pairs."""
    out = []
    for p in prompts:
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            out.append((p[0], _ids(p[1])))
        else:
            out.append(("", _ids(p)))
    return out


def generate_json(prompts, max_tokens: int, temperature: float, stop_ids, seed, teacher: str = "") -> dict:
    body = {"prompts": [{"id": i, "token_ids": ids} for i, ids in prompts], "max_tokens": int(max_tokens),
            "temperature": float(temperature), "stop_ids": _ids(stop_ids)}
    if seed is not None:
        body["seed"] = int(seed)
    if teacher:
        body["teacher"] = teacher
    return body


def generate_from_json(d: dict) -> GenerateResponse:
    u = d.get("usage", {})
    return GenerateResponse(
        model=model_from_json(d["model"]),
        results=[Generation(id=r.get("id", ""), token_ids_T=np.asarray(r["token_ids"], dtype=np.int64),
                            logprobs_T=np.asarray(r["logprobs"], dtype=np.float32),
                            finish_reason=r.get("finish_reason", "")) for r in d["results"]],
        usage=GenerateUsage(u.get("prompt_tokens", 0), u.get("generated_tokens", 0)))


def generate_proto(prompts, max_tokens: int, temperature: float, stop_ids, seed,
                   teacher: str = "") -> pb.GenerateRequest:
    msg = pb.GenerateRequest(prompts=[pb.Prompt(id=i, token_ids=ids) for i, ids in prompts],
                             max_tokens=int(max_tokens), temperature=float(temperature), stop_ids=_ids(stop_ids),
                             teacher=teacher)
    if seed is not None:
        msg.seed = int(seed)
    return msg


def generate_from_proto(resp: pb.GenerateResponse) -> GenerateResponse:
    return GenerateResponse(
        model=model_from_proto(resp.model),
        results=[Generation(id=r.id, token_ids_T=np.array(r.token_ids, dtype=np.int64),
                            logprobs_T=np.array(r.logprobs, dtype=np.float32), finish_reason=r.finish_reason)
                 for r in resp.results],
        usage=GenerateUsage(resp.usage.prompt_tokens, resp.usage.generated_tokens))
