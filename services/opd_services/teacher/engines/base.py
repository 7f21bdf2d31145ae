"""The engine protocol: what ScoringService needs from a model, and the typed items it passes.

An engine turns token ids into teacher logprobs. It knows nothing of HTTP, gRPC, requests,
batching policy or tenancy: it receives an already-validated batch and scores it (or samples
from it). `score` and `generate` are called from the batcher's single engine thread only; an
engine may run its own threads or processes behind it (the vLLM engine does) as long as they
block until done.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from opd_client.types import ModelInfo
from opd_services.modeling.sampling import Sampled, SampleParams  # noqa: F401  (part of the engine protocol)


MIN_SHARED_PREFIX = 16   # shorter common prefixes are not worth sharing (a second forward)


@dataclass(frozen=True, slots=True)
class ScoreItem:
    """One validated sequence with its scoring options."""

    token_ids: np.ndarray                   # int64 [L]
    score_from: int                         # 1 <= s < L
    top_k: int = 0
    temperature: float = 1.0
    entropy: bool = False
    candidate_ids_T_C: np.ndarray | None = None   # int64 [L - s, C]
    rank: bool = False                      # also the actual token's rank (1 = the argmax)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_scored(self) -> int:
        return self.n_tokens - self.score_from


@dataclass(frozen=True, slots=True)
class ItemScores:
    """An engine's answer for one ScoreItem; axis T runs over positions [s, L)."""

    logprobs_T: np.ndarray                          # float32 [T]
    top_ids_T_K: np.ndarray | None = None           # int64 [T, K]
    top_logprobs_T_K: np.ndarray | None = None      # float32 [T, K]
    candidate_logprobs_T_C: np.ndarray | None = None  # float32 [T, C]
    entropy_T: np.ndarray | None = None             # float32 [T]
    rank_T: np.ndarray | None = None                # int64 [T]: 1 + #(vocab logprobs > the actual token's)


@dataclass(frozen=True, slots=True)
class GenerateItem:
    """One validated generation request: prompts share the sampling parameters."""

    prompts: list[np.ndarray]               # int64 [L_i] each
    params: SampleParams

    @property
    def n_tokens(self) -> int:
        return sum(int(p.shape[0]) for p in self.prompts) + self.params.max_tokens * len(self.prompts)


class Engine(Protocol):
    info: ModelInfo

    def score(self, items: list[ScoreItem]) -> list[ItemScores]:
        """Score a batch; blocking. Results are in the order of `items`."""
        ...

    def generate(self, item: GenerateItem) -> list[Sampled]:
        """Sample one completion per prompt; blocking. Results are in the order of the prompts."""
        ...

    def close(self) -> None:
        ...


# Optional engine hook: `check(item, field) -> None`, called by ScoringService.validate for each
# item before it is queued; it raises InvalidRequest(field, reason) for an item the engine cannot
# serve (e.g. the vLLM engine and a vocabulary too large for the full-distribution path). It is
# optional so that engines serving every valid item need not define it.


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The dtype config.json declares ("dtype", or the older "torch_dtype"), if any."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def auto_dtype(model_dir: str | Path, cuda: bool) -> str:
    """What OPD_DTYPE=auto means, the same for every engine: on CPU the checkpoint's own dtype
    (float32 if it declares none); on CUDA bfloat16, unless the checkpoint is float16 or bfloat16."""
    declared = checkpoint_dtype(model_dir)
    if cuda:
        return declared if declared in ("float16", "bfloat16") else "bfloat16"
    return declared if declared in ("float32", "float16", "bfloat16") else "float32"


REVISION_GLOBS = ("*.safetensors", "*.bin", "*.pt", "config.json", "tokenizer*", "*.model",
                  "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template*")


def revision_hash(model_dir: str | Path) -> str:
    """sha256 over the weights, config and tokenizer files (names and bytes), sorted."""
    root = Path(model_dir)
    files = sorted({p for g in REVISION_GLOBS for p in root.glob(g) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()
