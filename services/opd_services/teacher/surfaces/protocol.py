"""Wire schemas of the native surfaces: HTTP JSON (pydantic) and gRPC (protobuf), both ways.

Parsing turns a wire message into the service's `ScoreRequest`; rendering turns a
`ScoreResult` into the wire's shape. Range checks belong to ScoringService, not here:
this module only checks what the wire format itself cannot express (types, shapes).
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client.types import ModelInfo
from opd_services.errors import InvalidRequest
from opd_services.teacher.service import (GenerateRequest, GenerateResult, PromptIn, ScoreRequest, ScoreResult,
                                          SequenceIn)

# ---- HTTP JSON ---------------------------------------------------------------------------


class SequenceJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field("", description="Echoed in the result.")
    token_ids: list[StrictInt] = Field(..., description="Token ids, length L >= 2.")
    score_from: StrictInt = Field(1, description="First scored position s, 1 <= s < L.")
    candidate_ids: list[list[StrictInt]] | None = Field(
        None, description="Per scored position (L - s rows), the token ids whose logprobs you want.")


class ScoreRequestJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list[SequenceJSON]
    top_k: StrictInt = Field(0, description="Teacher top-k per position, 0 .. server max.")
    temperature: float = Field(1.0, description="Logits are divided by it before log-softmax; > 0.")
    entropy: StrictBool = Field(False, description="Also return the teacher's entropy per position.")
    teacher: str = Field("", description="The teacher meant (its OPD_TEACHER_NAME); another name -> 404. Empty = any.")

    def to_request(self) -> ScoreRequest:
        return ScoreRequest(
            sequences=[SequenceIn(token_ids=s.token_ids, score_from=s.score_from, id=s.id,
                                  candidate_ids=s.candidate_ids) for s in self.sequences],
            top_k=self.top_k, temperature=self.temperature, entropy=self.entropy, teacher=self.teacher)


class ModelJSON(BaseModel):
    name: str
    engine: str
    engine_version: str
    dtype: str
    revision: str
    vocab_size: int
    max_model_len: int
    max_top_k: int
    teacher: str = ""


class SequenceResultJSON(BaseModel):
    id: str
    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None
    entropy: list[float] | None = None


class UsageJSON(BaseModel):
    scored_tokens: int
    total_tokens: int


class ScoreResponseJSON(BaseModel):
    """Documented shape of POST /v1/score (rendered by `result_json`, numpy arrays inline)."""
    model: ModelJSON
    results: list[SequenceResultJSON]
    top_k: int
    usage: UsageJSON


def result_json(res: ScoreResult) -> dict:
    """A dict for orjson with OPT_SERIALIZE_NUMPY: arrays are written without Python lists."""
    results = []
    for rid, sc in zip(res.ids, res.scores):
        r = {"id": rid, "logprobs": sc.logprobs_T}
        if sc.top_ids_T_K is not None:
            r["top_ids"] = np.ascontiguousarray(sc.top_ids_T_K)
            r["top_logprobs"] = np.ascontiguousarray(sc.top_logprobs_T_K)
        if sc.candidate_logprobs_T_C is not None:
            r["candidate_logprobs"] = np.ascontiguousarray(sc.candidate_logprobs_T_C)
        if sc.entropy_T is not None:
            r["entropy"] = sc.entropy_T
        results.append(r)
    return {"model": res.model.to_dict(), "results": results, "top_k": res.top_k,
            "usage": {"scored_tokens": res.scored_tokens, "total_tokens": res.total_tokens}}


class PromptJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field("", description="Echoed in the result.")
    token_ids: list[StrictInt] = Field(..., description="Prompt token ids, length >= 1.")


class GenerateRequestJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[PromptJSON]
    max_tokens: StrictInt = Field(16, description="Most tokens sampled per prompt, 1 .. server max.")
    temperature: float = Field(1.0, description="Sampling temperature >= 0; 0 = greedy.")
    stop_ids: list[StrictInt] = Field([], description="A sampled stop id ends its sequence (and is returned).")
    seed: StrictInt | None = Field(None, description="Same seed and request -> same samples.")

    def to_request(self) -> GenerateRequest:
        return GenerateRequest(prompts=[PromptIn(token_ids=p.token_ids, id=p.id) for p in self.prompts],
                               max_tokens=self.max_tokens, temperature=self.temperature,
                               stop_ids=self.stop_ids, seed=self.seed)


class GenerationJSON(BaseModel):
    id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class GenerateUsageJSON(BaseModel):
    prompt_tokens: int
    generated_tokens: int


class GenerateResponseJSON(BaseModel):
    """Documented shape of POST /v1/generate."""
    model: ModelJSON
    results: list[GenerationJSON]
    usage: GenerateUsageJSON


def generate_json(res: GenerateResult) -> dict:
    return {"model": res.model.to_dict(),
            "results": [{"id": rid, "token_ids": x.token_ids_T, "logprobs": x.logprobs_T,
                         "finish_reason": x.finish_reason} for rid, x in zip(res.ids, res.samples)],
            "usage": {"prompt_tokens": res.prompt_tokens, "generated_tokens": res.generated_tokens}}


# ---- gRPC --------------------------------------------------------------------------------


def request_from_proto(msg: pb.ScoreRequest) -> ScoreRequest:
    seqs = []
    for i, s in enumerate(msg.sequences):
        cands = None
        if s.candidate_width or len(s.candidate_ids):
            flat = np.array(s.candidate_ids, dtype=np.int64)
            if s.candidate_width <= 0 or flat.size % s.candidate_width:
                raise InvalidRequest(f"sequences[{i}].candidate_ids",
                                     f"{flat.size} ids do not fill rows of candidate_width={s.candidate_width}")
            cands = flat.reshape(-1, s.candidate_width)
        seqs.append(SequenceIn(token_ids=np.array(s.token_ids, dtype=np.int64),
                               score_from=s.score_from or 1, id=s.id, candidate_ids=cands))
    temperature = msg.temperature if msg.HasField("temperature") else 1.0
    return ScoreRequest(sequences=seqs, top_k=msg.top_k, temperature=temperature, entropy=msg.entropy,
                        teacher=msg.teacher)


def model_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**info.to_dict())


def result_proto(res: ScoreResult) -> pb.ScoreResponse:
    out = pb.ScoreResponse(model=model_proto(res.model), top_k=res.top_k,
                           usage=pb.Usage(scored_tokens=res.scored_tokens, total_tokens=res.total_tokens))
    for rid, sc in zip(res.ids, res.scores):
        r = out.results.add(id=rid, logprobs=sc.logprobs_T.tolist())
        if sc.top_ids_T_K is not None:
            r.top_ids.extend(sc.top_ids_T_K.reshape(-1).tolist())
            r.top_logprobs.extend(sc.top_logprobs_T_K.reshape(-1).tolist())
        if sc.candidate_logprobs_T_C is not None:
            r.candidate_logprobs.extend(sc.candidate_logprobs_T_C.reshape(-1).tolist())
            r.candidate_width = sc.candidate_logprobs_T_C.shape[1]
        if sc.entropy_T is not None:
            r.entropy.extend(sc.entropy_T.tolist())
    return out


def generate_from_proto(msg: pb.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        prompts=[PromptIn(token_ids=np.array(p.token_ids, dtype=np.int64), id=p.id) for p in msg.prompts],
        max_tokens=msg.max_tokens or 16,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        stop_ids=list(msg.stop_ids), seed=msg.seed if msg.HasField("seed") else None)


def generate_proto(res: GenerateResult) -> pb.GenerateResponse:
    out = pb.GenerateResponse(model=model_proto(res.model), usage=pb.GenerateUsage(
        prompt_tokens=res.prompt_tokens, generated_tokens=res.generated_tokens))
    for rid, x in zip(res.ids, res.samples):
        out.results.add(id=rid, token_ids=x.token_ids_T.tolist(), logprobs=x.logprobs_T.tolist(),
                        finish_reason=x.finish_reason)
    return out
