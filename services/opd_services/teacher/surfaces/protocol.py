"""Wire schemas of the native surfaces: HTTP JSON (pydantic) and gRPC (protobuf), both ways.

Parsing turns a wire message into the service's `ScoreRequest`; rendering turns a
`ScoreResult` into the wire's shape. Range checks belong to ScoringService, not here:
this module only checks what the wire format itself cannot express (types, shapes).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client.types import ModelInfo
from opd_services.errors import InvalidRequest
from opd_services.teacher.service import (GenerateRequest, GenerateResult, PromptIn, ScoreRequest, ScoreResult,
                                          SequenceIn)
from opd_services.teacher.surfaces.common import Int, Number

# ---- HTTP JSON ---------------------------------------------------------------------------


class SequenceJSON(BaseModel):
    """One of token_ids, text or messages."""
    model_config = ConfigDict(extra="forbid")
    id: str = Field("", description="Echoed in the result.")
    token_ids: list[Int] | None = Field(None, description="Token ids, length L >= 2.")
    score_from: Int | None = Field(None, description="With token_ids: first scored position s, 1 <= s < L "
                                                           "(default 1).")
    text: str | None = Field(None, description="Text, tokenized by the teacher's tokenizer (special tokens added "
                                               "unless add_special_tokens is false).")
    score_from_char: Int | None = Field(None, description="With text: the character where scoring starts (a "
                                                                "token boundary); default: after the first token.")
    messages: list[dict[str, Any]] | None = Field(
        None, description="Chat messages ({role, content, [score]}), rendered with the model's chat template; "
                          "scoring runs from the first scored message (assistant ones, or score: true) to the end.")
    candidate_ids: list[list[Int]] | None = Field(
        None, description="Per scored position (L - s rows), the token ids whose logprobs you want.")


class ScoreRequestJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list[SequenceJSON]
    top_k: Int = Field(0, description="Teacher top-k per position, 0 .. server max.")
    temperature: Number = Field(1.0, description="Logits are divided by it before log-softmax; > 0.")
    entropy: StrictBool = Field(False, description="Also return the teacher's entropy per position.")
    teacher: str = Field("", description="The teacher meant (its OPD_TEACHER_NAME); another name -> 404. Empty = any.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="messages: extra chat template variables, "
                                                                          "e.g. {\"enable_thinking\": false}.")
    add_special_tokens: StrictBool = Field(True, description="text: let the tokenizer add its special tokens (BOS).")

    def to_request(self) -> ScoreRequest:
        return ScoreRequest(
            sequences=[SequenceIn(token_ids=s.token_ids, score_from=s.score_from, id=s.id,
                                  candidate_ids=s.candidate_ids, text=s.text, score_from_char=s.score_from_char,
                                  messages=s.messages) for s in self.sequences],
            top_k=self.top_k, temperature=self.temperature, entropy=self.entropy, teacher=self.teacher,
            chat_template_kwargs=self.chat_template_kwargs, add_special_tokens=self.add_special_tokens)


class TokenizerJSON(BaseModel):
    name: str
    vocab_size: int
    special_ids: dict[str, int]
    files_sha256: str
    chat_template_sha256: str


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
    tokenizer: TokenizerJSON | None = None


class SequenceResultJSON(BaseModel):
    id: str
    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None
    entropy: list[float] | None = None
    token_ids: list[int] | None = Field(None, description="text / messages: the ids scored (the whole sequence).")
    score_from: int | None = Field(None, description="text / messages: the first scored position.")
    offsets: list[list[int]] | None = Field(None, description="text / messages: per scored token, its characters "
                                                              "[start, end) in `text` (or in the sent text).")
    text: str | None = Field(None, description="messages: the rendered chat text the offsets refer to.")
    message_spans: list[list[int]] | None = Field(None, description="messages: per message, its tokens [start, end) "
                                                                    "(end-of-turn token included); [-1, -1] = not "
                                                                    "rendered verbatim.")


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
    for rid, sc, view in zip(res.ids, res.scores, res.views):
        r = {"id": rid, "logprobs": sc.logprobs_T}
        if sc.top_ids_T_K is not None:
            r["top_ids"] = np.ascontiguousarray(sc.top_ids_T_K)
            r["top_logprobs"] = np.ascontiguousarray(sc.top_logprobs_T_K)
        if sc.candidate_logprobs_T_C is not None:
            r["candidate_logprobs"] = np.ascontiguousarray(sc.candidate_logprobs_T_C)
        if sc.entropy_T is not None:
            r["entropy"] = sc.entropy_T
        if view is not None:
            r |= {"token_ids": view.token_ids_L, "score_from": view.score_from,
                  "offsets": np.ascontiguousarray(view.offsets_T_2)}
            if view.message_spans_M_2 is not None:
                r |= {"text": view.text, "message_spans": view.message_spans_M_2}
        results.append(r)
    return {"model": res.model.to_dict(), "results": results, "top_k": res.top_k,
            "usage": {"scored_tokens": res.scored_tokens, "total_tokens": res.total_tokens}}


class PromptJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field("", description="Echoed in the result.")
    token_ids: list[Int] = Field(..., description="Prompt token ids, length >= 1.")


class GenerateRequestJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[PromptJSON]
    max_tokens: Int = Field(16, description="Most tokens sampled per prompt, 1 .. server max.")
    temperature: Number = Field(1.0, description="Sampling temperature >= 0; 0 = greedy.")
    stop_ids: list[Int] = Field([], description="A sampled stop id ends its sequence (and is returned).")
    seed: Int | None = Field(None, description="Same seed and request -> same samples.")
    teacher: str = Field("", description="The teacher meant (its OPD_TEACHER_NAME); another name -> 404. Empty = any.")

    def to_request(self) -> GenerateRequest:
        return GenerateRequest(prompts=[PromptIn(token_ids=p.token_ids, id=p.id) for p in self.prompts],
                               max_tokens=self.max_tokens, temperature=self.temperature,
                               stop_ids=self.stop_ids, seed=self.seed, teacher=self.teacher)


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


def _messages_from_proto(msgs, field: str) -> list[dict] | None:
    if not msgs:
        return None
    out = []
    for j, m in enumerate(msgs):
        d = {}
        if m.extra_json:
            try:
                d = orjson.loads(m.extra_json)
            except orjson.JSONDecodeError as e:
                raise InvalidRequest(f"{field}.messages[{j}].extra_json", f"malformed JSON: {e}") from None
            if not isinstance(d, dict):
                raise InvalidRequest(f"{field}.messages[{j}].extra_json", "must be a JSON object")
        d |= {"role": m.role, "content": m.content}
        if m.HasField("score"):
            d["score"] = m.score
        out.append(d)
    return out


def _json_object(raw: str, field: str) -> dict | None:
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(field, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(field, "must be a JSON object")
    return value


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
        text = s.text if s.HasField("text") else None
        messages = _messages_from_proto(s.messages, f"sequences[{i}]")
        ids = np.array(s.token_ids, dtype=np.int64) if len(s.token_ids) or (text is None and messages is None) else None
        seqs.append(SequenceIn(token_ids=ids, score_from=s.score_from or None, id=s.id, candidate_ids=cands,
                               text=text, score_from_char=s.score_from_char if s.HasField("score_from_char") else None,
                               messages=messages))
    temperature = msg.temperature if msg.HasField("temperature") else 1.0
    return ScoreRequest(sequences=seqs, top_k=msg.top_k, temperature=temperature, entropy=msg.entropy,
                        teacher=msg.teacher,
                        chat_template_kwargs=_json_object(msg.chat_template_kwargs_json, "chat_template_kwargs_json"),
                        add_special_tokens=msg.add_special_tokens if msg.HasField("add_special_tokens") else True)


def model_proto(info: ModelInfo) -> pb.ModelInfo:
    d = info.to_dict()
    tok = d.pop("tokenizer")
    out = pb.ModelInfo(**d)
    if tok is not None:
        out.tokenizer.CopyFrom(pb.TokenizerInfo(**tok))
    return out


def result_proto(res: ScoreResult) -> pb.ScoreResponse:
    out = pb.ScoreResponse(model=model_proto(res.model), top_k=res.top_k,
                           usage=pb.Usage(scored_tokens=res.scored_tokens, total_tokens=res.total_tokens))
    for rid, sc, view in zip(res.ids, res.scores, res.views):
        r = out.results.add(id=rid, logprobs=sc.logprobs_T.tolist())
        if sc.top_ids_T_K is not None:
            r.top_ids.extend(sc.top_ids_T_K.reshape(-1).tolist())
            r.top_logprobs.extend(sc.top_logprobs_T_K.reshape(-1).tolist())
        if sc.candidate_logprobs_T_C is not None:
            r.candidate_logprobs.extend(sc.candidate_logprobs_T_C.reshape(-1).tolist())
            r.candidate_width = sc.candidate_logprobs_T_C.shape[1]
        if sc.entropy_T is not None:
            r.entropy.extend(sc.entropy_T.tolist())
        if view is not None:
            r.token_ids.extend(view.token_ids_L.tolist())
            r.score_from = view.score_from
            r.offsets.extend(view.offsets_T_2.reshape(-1).tolist())
            if view.message_spans_M_2 is not None:
                r.text = view.text
                r.message_spans.extend(view.message_spans_M_2.reshape(-1).tolist())
    return out


def generate_from_proto(msg: pb.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        prompts=[PromptIn(token_ids=np.array(p.token_ids, dtype=np.int64), id=p.id) for p in msg.prompts],
        max_tokens=msg.max_tokens or 16,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        stop_ids=list(msg.stop_ids), seed=msg.seed if msg.HasField("seed") else None, teacher=msg.teacher)


def generate_proto(res: GenerateResult) -> pb.GenerateResponse:
    out = pb.GenerateResponse(model=model_proto(res.model), usage=pb.GenerateUsage(
        prompt_tokens=res.prompt_tokens, generated_tokens=res.generated_tokens))
    for rid, x in zip(res.ids, res.samples):
        out.results.add(id=rid, token_ids=x.token_ids_T.tolist(), logprobs=x.logprobs_T.tolist(),
                        finish_reason=x.finish_reason)
    return out
