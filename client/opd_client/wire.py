"""Client-side encoding of score requests and decoding of responses, for HTTP JSON and gRPC.

The server's side of the same contract lives in `opd_services.teacher.surfaces.protocol`; a test
holds the two to the same numbers. Nothing here does I/O.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client.types import (GenerateResponse, GenerateUsage, Generation, ModelInfo, ScoreResponse, Sequence,
                              SequenceScores, Usage)

SequenceLike = Sequence | Iterable[int]


def as_sequences(sequences: Iterable[SequenceLike]) -> list[Sequence]:
    """Accept Sequence objects or bare token-id lists (scored from position 1)."""
    out = []
    for s in sequences:
        out.append(s if isinstance(s, Sequence) else Sequence(token_ids=list(s)))
    return out


def _ids(a) -> list[int]:
    return np.asarray(a, dtype=np.int64).reshape(-1).tolist()


# ---- HTTP JSON -------------------------------------------------------------------------

def request_json(seqs: list[Sequence], top_k: int, temperature: float, entropy: bool, teacher: str = "") -> dict:
    body_seqs = []
    for s in seqs:
        d = {"token_ids": _ids(s.token_ids), "score_from": int(s.score_from)}
        if s.id:
            d["id"] = s.id
        if s.candidate_ids_T_C is not None:
            d["candidate_ids"] = np.asarray(s.candidate_ids_T_C, dtype=np.int64).tolist()
        body_seqs.append(d)
    body = {"top_k": int(top_k), "temperature": float(temperature), "entropy": bool(entropy),
            "sequences": body_seqs}
    if teacher:
        body["teacher"] = teacher
    return body


def model_from_json(d: dict) -> ModelInfo:
    return ModelInfo(**{k: d[k] for k in ModelInfo.__dataclass_fields__ if k in d})


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
        ))
    u = d.get("usage", {})
    return ScoreResponse(model=model_from_json(d["model"]), results=results,
                         usage=Usage(u.get("scored_tokens", 0), u.get("total_tokens", 0)),
                         top_k=int(d.get("top_k", 0)))


# ---- gRPC --------------------------------------------------------------------------------

def request_proto(seqs: list[Sequence], top_k: int, temperature: float, entropy: bool,
                  teacher: str = "") -> pb.ScoreRequest:
    msgs = []
    for s in seqs:
        m = pb.Sequence(id=s.id, token_ids=_ids(s.token_ids), score_from=int(s.score_from))
        if s.candidate_ids_T_C is not None:
            c = np.asarray(s.candidate_ids_T_C, dtype=np.int64)
            if c.ndim != 2:
                raise ValueError("candidate_ids_T_C must be 2-D: one row per scored position")
            m.candidate_ids.extend(c.reshape(-1).tolist())
            m.candidate_width = c.shape[1]
        msgs.append(m)
    return pb.ScoreRequest(sequences=msgs, top_k=int(top_k), temperature=float(temperature),
                           entropy=bool(entropy), teacher=teacher)


def model_from_proto(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(name=m.name, engine=m.engine, engine_version=m.engine_version, dtype=m.dtype,
                     revision=m.revision, vocab_size=m.vocab_size, max_model_len=m.max_model_len,
                     max_top_k=m.max_top_k, teacher=m.teacher)


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
                                      entropy_T=ent))
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


def generate_json(prompts, max_tokens: int, temperature: float, stop_ids, seed) -> dict:
    body = {"prompts": [{"id": i, "token_ids": ids} for i, ids in prompts], "max_tokens": int(max_tokens),
            "temperature": float(temperature), "stop_ids": _ids(stop_ids)}
    if seed is not None:
        body["seed"] = int(seed)
    return body


def generate_from_json(d: dict) -> GenerateResponse:
    u = d.get("usage", {})
    return GenerateResponse(
        model=model_from_json(d["model"]),
        results=[Generation(id=r.get("id", ""), token_ids_T=np.asarray(r["token_ids"], dtype=np.int64),
                            logprobs_T=np.asarray(r["logprobs"], dtype=np.float32),
                            finish_reason=r.get("finish_reason", "")) for r in d["results"]],
        usage=GenerateUsage(u.get("prompt_tokens", 0), u.get("generated_tokens", 0)))


def generate_proto(prompts, max_tokens: int, temperature: float, stop_ids, seed) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(prompts=[pb.Prompt(id=i, token_ids=ids) for i, ids in prompts],
                             max_tokens=int(max_tokens), temperature=float(temperature), stop_ids=_ids(stop_ids))
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
