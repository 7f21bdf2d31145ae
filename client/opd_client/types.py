"""Typed values that cross the wire: what a caller sends and what the teacher returns.

Arrays are numpy with the axis in the name's suffix (T = scored positions, K = top-k,
C = candidates). This module holds plain data only; encoding lives in `opd_client.wire`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sequence:
    """One sequence to score, given as token ids, text or chat messages (one of them).

    token_ids + score_from: every position in [score_from, len(token_ids)) is scored.
    text + score_from_char: the teacher tokenizes the text; tokens after the character
    score_from_char (a token boundary) are scored (default: all but the first).
    messages: [{"role", "content", optional "score": bool}], rendered with the teacher's chat
    template; scoring runs from the first scored message (assistant ones by default) to the end.
    The result of a text or messages sequence carries the ids it scored and their offsets.
    candidate_ids_T_C: optional, one row of token ids per scored position (same width
    on every row), e.g. the student's own top-k at that position.
    """

    token_ids: np.ndarray | list[int] | None = None
    score_from: int = 1
    id: str = ""
    candidate_ids_T_C: np.ndarray | list[list[int]] | None = None
    text: str | None = None
    score_from_char: int | None = None
    messages: list[dict] | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    """The teacher's tokenizer: compare `files_sha256` and `chat_template_sha256` with
    `opd_client.tokenizer_fingerprint(student_folder)` to know the student shares it."""

    name: str
    vocab_size: int                 # len(tokenizer), added tokens included
    special_ids: dict               # {"bos", "eos", "pad", "unk"}: those the tokenizer defines
    files_sha256: str               # over its files (opd_client.tokenizer_id.files_sha256)
    chat_template_sha256: str = ""  # "" = no chat template

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    engine: str
    engine_version: str
    dtype: str
    revision: str
    vocab_size: int
    max_model_len: int
    max_top_k: int = 0
    teacher: str = ""          # the teacher's name in its deployment (OPD_TEACHER_NAME)
    tokenizer: TokenizerInfo | None = None   # None: the model folder has no tokenizer (ids only)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tokenizer"] = None if self.tokenizer is None else self.tokenizer.to_dict()
        return d


@dataclass(frozen=True)
class SequenceScores:
    """Teacher scores of one sequence; index t is the token at position score_from + t."""

    id: str
    logprobs_T: np.ndarray
    top_ids_T_K: np.ndarray | None = None
    top_logprobs_T_K: np.ndarray | None = None
    candidate_logprobs_T_C: np.ndarray | None = None
    entropy_T: np.ndarray | None = None
    # text / messages input: the ids the teacher's tokenizer gave, where scoring started, each scored
    # token's characters [start, end) in the text (for messages: in `text`, the rendered chat), and
    # each message's token range [start, end) (end-of-turn token included; -1 = not rendered verbatim)
    token_ids_L: np.ndarray | None = None
    score_from: int | None = None
    offsets_T_2: np.ndarray | None = None
    text: str | None = None
    message_spans_M_2: np.ndarray | None = None


@dataclass(frozen=True)
class Usage:
    scored_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class ScoreResponse:
    model: ModelInfo
    results: list[SequenceScores]
    usage: Usage
    top_k: int = 0
    extras: dict = field(default_factory=dict)


# ---- rollouts: what flows through the queue (encoded by opd_client.codec) ------------------
# Axes: L = the rollout's tokens; T = L - score_from, the scored (completion) positions.

def is_int(x) -> bool:
    """An integer, Python's or numpy's, and not a boolean (True is an int to Python): the one test of an
    integer field the client and the teacher both make."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_unicode(text: str, field: str) -> None:
    """InvalidRequest naming `field` where `text` holds a lone surrogate (no Unicode character, no UTF-8):
    the one check the client and the teacher both make."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        from opd_client.errors import InvalidRequest
        raise InvalidRequest(field, f"is not valid Unicode: a lone surrogate at character {e.start}; "
                                    "send UTF-8 text") from None


def _array(name: str, value, dtype, shape: tuple) -> np.ndarray:
    """`value` as a C-contiguous array of `dtype` and `shape` (-1 = any), or InvalidRequest."""
    if (type(value) is np.ndarray and value.dtype == dtype and value.ndim == len(shape)
            and value.flags.c_contiguous and all(w in (-1, g) for w, g in zip(shape, value.shape))):
        return value                     # the decoder's and the scorer's hot path: already right
    from opd_client.errors import InvalidRequest
    try:
        arr = np.ascontiguousarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequest(name, f"must be an array of {np.dtype(dtype).name}: {e}") from None
    want = tuple(shape)
    if arr.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want, arr.shape)):
        raise InvalidRequest(name, f"must have shape {list(want)}, got {list(arr.shape)}")
    return arr


@dataclass(frozen=True, eq=False)
class Rollout:
    """One student rollout to score: the teacher scores positions [score_from, L).

    token_ids: int32[L], prompt and completion. loss_mask: uint8[L - score_from], 1 where the
    trainer trains on the token (0 for tool / environment tokens: scored for context only);
    None = all ones. behaviour_logprobs: float32[L - score_from], the student's logprobs
    when it sampled; None = zeros. top_k: how many teacher alternatives per position the
    trainer wants (0 = logprobs of the sampled tokens only). teacher: the teacher that should
    score it (a name in the scorer's OPD_TEACHERS); "" = the experiment's default teacher.
    Arrays are coerced to their dtype; a wrong shape raises InvalidRequest naming the field.
    """

    id: str
    token_ids: np.ndarray
    score_from: int
    loss_mask: np.ndarray | None = None
    behaviour_logprobs: np.ndarray | None = None
    policy_version: int = 0
    sampled_at: float = 0.0
    metadata: dict = field(default_factory=dict)
    top_k: int = 0
    teacher: str = ""

    def __post_init__(self):
        from opd_client.errors import InvalidRequest
        if not isinstance(self.teacher, str):
            raise InvalidRequest("teacher", f"must be a teacher's name (a string), got {type(self.teacher).__name__}")
        if not isinstance(self.id, str):
            raise InvalidRequest("id", f"must be a string, got {type(self.id).__name__}")
        tok = _array("token_ids", self.token_ids, np.int32, (-1,))
        s = self.score_from
        if not is_int(s) or not 0 <= s <= len(tok):
            raise InvalidRequest("score_from", f"must be an integer in [0, {len(tok)}] for {len(tok)} tokens, got {s!r}")
        t = len(tok) - int(s)
        mask = np.ones(t, np.uint8) if self.loss_mask is None else _array("loss_mask", self.loss_mask, np.uint8, (t,))
        blp = (np.zeros(t, np.float32) if self.behaviour_logprobs is None
               else _array("behaviour_logprobs", self.behaviour_logprobs, np.float32, (t,)))
        if not isinstance(self.metadata, dict):
            raise InvalidRequest("metadata", f"must be a dict, got {type(self.metadata).__name__}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        for k, v in (("token_ids", tok), ("score_from", int(s)), ("loss_mask", mask),
                     ("behaviour_logprobs", blp), ("policy_version", int(self.policy_version)),
                     ("sampled_at", float(self.sampled_at)), ("top_k", int(self.top_k))):
            object.__setattr__(self, k, v)

    @property
    def n_scored(self) -> int:
        return len(self.token_ids) - self.score_from

    @classmethod
    def _trusted(cls, **fields) -> "Rollout":
        """Build without re-checking: for the codec, which has checked every dtype and length."""
        self = object.__new__(cls)
        fields.setdefault("teacher", "")
        if fields["loss_mask"] is None:
            fields["loss_mask"] = np.ones(len(fields["token_ids"]) - fields["score_from"], np.uint8)
        for k, v in fields.items():
            object.__setattr__(self, k, v)
        return self


@dataclass(frozen=True, eq=False)
class ScoredRollout:
    """A rollout with the teacher's scores; index t is position rollout.score_from + t.

    teacher_logprobs: float32[T]; top_ids: int32[T, K] and top_logprobs: float32[T, K]
    (descending) when the rollout asked for top_k > 0, else None. model_revision: the
    teacher's weights + tokenizer hash, so a trainer can refuse a silent teacher swap.
    teacher: the name of the teacher that scored it (its OPD_TEACHER_NAME; "" from a
    single-teacher deployment that names none).
    """

    rollout: Rollout
    teacher_logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    model_revision: str = ""
    scored_at: float = 0.0
    teacher: str = ""

    def __post_init__(self):
        t = self.rollout.n_scored
        object.__setattr__(self, "teacher_logprobs", _array("teacher_logprobs", self.teacher_logprobs, np.float32, (t,)))
        if (self.top_ids is None) != (self.top_logprobs is None):
            from opd_client.errors import InvalidRequest
            raise InvalidRequest("top_ids", "top_ids and top_logprobs come together or not at all")
        if self.top_ids is not None:
            ids = _array("top_ids", self.top_ids, np.int32, (t, -1))
            object.__setattr__(self, "top_ids", ids)
            object.__setattr__(self, "top_logprobs", _array("top_logprobs", self.top_logprobs, np.float32, ids.shape))
        object.__setattr__(self, "scored_at", float(self.scored_at))


@dataclass(frozen=True)
class Generation:
    """One teacher sample: ids and the logprob of each under the distribution sampled from."""

    id: str
    token_ids_T: np.ndarray         # int64 [T]
    logprobs_T: np.ndarray          # float32 [T]
    finish_reason: str              # "stop" (ends with a stop id) | "length"


@dataclass(frozen=True)
class GenerateUsage:
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class GenerateResponse:
    model: ModelInfo
    results: list[Generation]
    usage: GenerateUsage
