"""Typed values that cross the wire: what a caller sends and what the teacher returns.

Arrays are numpy with the axis in the name's suffix (T = scored positions, K = top-k,
C = candidates). This module holds plain data only; encoding lives in `opd_client.wire`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sequence:
    """One sequence to score: every position in [score_from, len(token_ids)).

    candidate_ids_T_C: optional, one row of token ids per scored position (same width
    on every row), e.g. the student's own top-k at that position.
    """

    token_ids: np.ndarray | list[int]
    score_from: int = 1
    id: str = ""
    candidate_ids_T_C: np.ndarray | list[list[int]] | None = None


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SequenceScores:
    """Teacher scores of one sequence; index t is the token at position score_from + t."""

    id: str
    logprobs_T: np.ndarray
    top_ids_T_K: np.ndarray | None = None
    top_logprobs_T_K: np.ndarray | None = None
    candidate_logprobs_T_C: np.ndarray | None = None
    entropy_T: np.ndarray | None = None


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
