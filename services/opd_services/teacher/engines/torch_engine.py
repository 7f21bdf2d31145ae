"""Torch engine: exact teacher logprobs from a transformers causal LM, on CPU or CUDA.

How it scores a batch:
  1) right-pad the sequences and run the decoder body once (no LM head); sequences that share a
     prefix run it once and the rest on its KV, and prefixes come from the prefix KV cache
     when they are there (engines/prefix.py; the hidden states are the same);
  2) gather only the hidden states that predict positions [s, L) of each sequence;
  3) push those rows through the LM head in chunks, each chunk in float32:
     log-softmax statistics, the target logprob, top-k, candidates and entropy;
  4) split the rows back per sequence.
The full [batch, length, vocab] logits tensor is never built. Causal attention means right
padding cannot change any real position's result.
Generation (`generate`) is delegated to opd_services.modeling.sampling (KV-cached, left-padded).
This module does not validate requests, batch them, or know about any wire format.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from opd_client.types import ModelInfo
from opd_services.teacher.engines.base import (GenerateItem, ItemScores, Sampled, ScoreItem, auto_dtype,
                                               revision_hash)
from opd_services.teacher.engines.prefix import PrefixCache, export_metrics, install, shared_hidden

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20   # float32 logits per LM-head chunk
COUNT_BLOCK = 1 << 19    # logits per block when counting a token's rank on CPU (its mask fits in cache)


class OneDnnLinear(torch.nn.Linear):
    """nn.Linear whose forward is oneDNN's matmul, for inference on CPU. torch's CPU default for a
    float32 matmul is MKL, which runs an AVX2 path on AMD CPUs: on this repository's 2-core AMD VM
    oneDNN does the body-heavy bench model's linears 2.2-2.7x faster (430 vs 160-195 GFLOP/s) and
    its whole forward 1.6x (bench/RESULTS.md, "Prefix-shared scoring"); vLLM's CPU backend uses
    oneDNN too. Same weights, same module (its class is swapped in place); results differ from
    MKL's by float32 rounding (~3e-6 on unit-scale outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn_linears(model: torch.nn.Module) -> bool:
    """Swap every nn.Linear of a float32 CPU model to OneDnnLinear, if oneDNN is there and agrees
    with torch's own matmul on a probe; False (nothing changed) otherwise. Inference only: the op
    has no autograd, so only the teacher's engine uses it."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if not linears or linears[0].weight.device.type != "cpu" or linears[0].weight.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        log.warning("torch engine: oneDNN is not available in this torch build; linears use torch's default")
        return False
    probe = linears[0]
    x = torch.randn(3, 5, probe.in_features, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            want = probe(x)
            got = torch.ops.mkldnn._linear_pointwise(x, probe.weight, probe.bias, "none", [], "")
        ok = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    except RuntimeError as e:
        log.warning("torch engine: oneDNN linear failed its probe (%s); linears use torch's default", e)
        return False
    if not ok:
        log.warning("torch engine: oneDNN linear disagrees with torch's matmul on a probe; linears use torch's default")
        return False
    for m in linears:
        m.__class__ = OneDnnLinear
    return True


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, model_dir: str | Path) -> torch.dtype:
    if dtype == "auto":
        dtype = auto_dtype(model_dir, cuda=device.type == "cuda")
    return getattr(torch, dtype)


class TorchEngine:
    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: str = "auto",
                 max_top_k: int = 20, name: str | None = None, prefix_cache_mb: float = 0,
                 share_prefixes: bool = True, cpu_onednn: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device, model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        self.onednn = cpu_onednn and use_onednn_linears(self.model)
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.vocab_size = int(self.head.weight.shape[0])
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.chunk_rows = max(16, CHUNK_BYTES // (4 * self.vocab_size))
        if share_prefixes and not install(self.model):
            log.warning("torch engine: %s's attention is not plain causal SDPA (%s); prefix sharing is off",
                        Path(model_dir).name, config._attn_implementation)
            share_prefixes = False
        self.share_prefixes = share_prefixes
        if share_prefixes:
            export_metrics("torch")
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20))) if share_prefixes and prefix_cache_mb > 0 else None
        self.info = ModelInfo(
            name=name or Path(model_dir).resolve().name, engine="torch", engine_version=torch.__version__,
            dtype=str(self.dtype).removeprefix("torch."), revision=revision_hash(model_dir),
            vocab_size=self.vocab_size, max_model_len=int(getattr(config, "max_position_embeddings", 4096)),
            max_top_k=max_top_k)
        log.info("torch engine: %s on %s (%s), vocab %d, prefix sharing %s, prefix cache %s MB, linears %s",
                 self.info.name, self.device, self.info.dtype, self.vocab_size, "on" if share_prefixes else "off",
                 prefix_cache_mb if self.prefix_cache else 0, "oneDNN" if self.onednn else "torch default")

    def close(self) -> None:
        self.model = self.body = self.head = None
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def generate(self, item: GenerateItem) -> list[Sampled]:
        from opd_services.modeling.sampling import sample
        return sample(self.model, item.prompts, item.params)

    @torch.inference_mode()
    def score(self, items: list[ScoreItem]) -> list[ItemScores]:
        # 1) decoder body over the right-padded batch
        hidden_BL_H = self._hidden(items)
        b, lmax, h = hidden_BL_H.shape
        # 2) rows predicting each scored token: hidden at i-1 predicts token i
        rows, targets, temps = [], [], []
        for i, it in enumerate(items):
            rows.append(np.arange(it.score_from - 1, it.n_tokens - 1) + i * lmax)
            targets.append(it.token_ids[it.score_from:])
            temps.append(np.full(it.n_scored, it.temperature, dtype=np.float32))
        rows_N = torch.from_numpy(np.concatenate(rows)).to(self.device)
        hidden_N_H = hidden_BL_H.reshape(b * lmax, h).index_select(0, rows_N)
        targets_N = torch.from_numpy(np.concatenate(targets)).to(self.device)
        temps_N = torch.from_numpy(np.concatenate(temps)).to(self.device)
        cands_N_C, width = self._candidates(items)
        # 3) LM head in chunks
        k = max(it.top_k for it in items)
        want_entropy = any(it.entropy for it in items)
        want_rank = any(it.rank for it in items)
        out = _Rows(targets_N.shape[0], k, width, want_entropy, want_rank)
        for lo in range(0, targets_N.shape[0], self.chunk_rows):
            hi = min(lo + self.chunk_rows, targets_N.shape[0])
            self._head_chunk(hidden_N_H[lo:hi], targets_N[lo:hi], temps_N[lo:hi],
                             None if cands_N_C is None else cands_N_C[lo:hi], k, want_entropy, want_rank, out, lo)
        # 4) split per sequence
        return out.split(items)

    def _hidden(self, items: list[ScoreItem]) -> torch.Tensor:
        if self.share_prefixes:
            hidden_BL_H = shared_hidden(self.body, [it.token_ids for it in items], [it.score_from for it in items],
                                        self.prefix_cache, self.device)
            if hidden_BL_H is not None:
                return hidden_BL_H
        lens = [it.n_tokens for it in items]
        lmax = max(lens)
        ids = np.zeros((len(items), lmax), dtype=np.int64)
        for i, it in enumerate(items):
            ids[i, : lens[i]] = it.token_ids
        ids_B_L = torch.from_numpy(ids).to(self.device)
        mask = None
        if min(lens) != lmax:
            mask = (torch.arange(lmax)[None, :] < torch.tensor(lens)[:, None]).long().to(self.device)
        return self.body(input_ids=ids_B_L, attention_mask=mask, use_cache=False).last_hidden_state

    def _candidates(self, items: list[ScoreItem]) -> tuple[torch.Tensor | None, int]:
        widths = [0 if it.candidate_ids_T_C is None else it.candidate_ids_T_C.shape[1] for it in items]
        width = max(widths)
        if width == 0:
            return None, 0
        blocks = []
        for it, w in zip(items, widths):
            blk = np.zeros((it.n_scored, width), dtype=np.int64)
            if w:
                blk[:, :w] = it.candidate_ids_T_C
            blocks.append(blk)
        return torch.from_numpy(np.concatenate(blocks)).to(self.device), width

    def _head_chunk(self, hidden_n_H, targets_n, temps_n, cands_n_C, k, want_entropy, want_rank, out, lo):
        logits_n_V = self.head(hidden_n_H).float()
        if self.softcap:
            logits_n_V = torch.tanh(logits_n_V / self.softcap) * self.softcap
        if not bool((temps_n == 1).all()):
            logits_n_V = logits_n_V / temps_n[:, None]
        lse_n = torch.logsumexp(logits_n_V, dim=-1)
        hi = lo + targets_n.shape[0]
        target_n = logits_n_V.gather(1, targets_n[:, None])[:, 0]
        out.logprobs[lo:hi] = (target_n - lse_n).cpu().numpy()
        vals = None
        if k:
            vals, ids = logits_n_V.topk(k, dim=-1)
            out.top_ids[lo:hi] = ids.cpu().numpy()
            out.top_logprobs[lo:hi] = (vals - lse_n[:, None]).cpu().numpy()
        if want_rank:
            out.rank[lo:hi] = _rank(logits_n_V, target_n, vals).cpu().numpy()
        if cands_n_C is not None:
            out.cands[lo:hi] = (logits_n_V.gather(1, cands_n_C) - lse_n[:, None]).cpu().numpy()
        if want_entropy:
            p = torch.softmax(logits_n_V, dim=-1)
            out.entropy[lo:hi] = (lse_n - (p * logits_n_V).sum(-1)).cpu().numpy()


def _rank(logits_n_V: torch.Tensor, target_n: torch.Tensor, top_vals_n_K: torch.Tensor | None) -> torch.Tensor:
    """1 + #(logits > the actual token's). A token at or above the k-th top value has every
    strictly larger logit inside the top-k, so the full-vocabulary count is needed only when some
    row's token lies outside its top-k."""
    if top_vals_n_K is None or bool((target_n < top_vals_n_K[:, -1]).any()):
        return _count_greater(logits_n_V, target_n) + 1
    return (top_vals_n_K > target_n[:, None]).sum(-1) + 1


def _count_greater(logits_n_V: torch.Tensor, target_n: torch.Tensor) -> torch.Tensor:
    """#(logits > target) per row. On CPU in blocks of rows of ~512k logits, so that each block's
    comparison mask (one byte per logit) stays in cache while it is summed: ~6x faster than one
    mask over the whole 64 MB chunk (bench/RESULTS.md, "Dialects"); exact for any vocabulary."""
    if logits_n_V.device.type != "cpu":
        return (logits_n_V > target_n[:, None]).sum(-1)
    n, v = logits_n_V.shape
    step = max(1, COUNT_BLOCK // v)
    out_n = torch.empty(n, dtype=torch.int64)
    for lo in range(0, n, step):
        mask = logits_n_V[lo:lo + step] > target_n[lo:lo + step, None]
        out_n[lo:lo + step] = mask.view(torch.uint8).sum(-1, dtype=torch.int32)
    return out_n


class _Rows:
    """Flat per-row results of a batch, filled chunk by chunk, then split per item."""

    def __init__(self, n: int, k: int, width: int, entropy: bool, rank: bool = False):
        self.logprobs = np.empty(n, dtype=np.float32)
        self.top_ids = np.empty((n, k), dtype=np.int64) if k else None
        self.top_logprobs = np.empty((n, k), dtype=np.float32) if k else None
        self.cands = np.empty((n, width), dtype=np.float32) if width else None
        self.entropy = np.empty(n, dtype=np.float32) if entropy else None
        self.rank = np.empty(n, dtype=np.int64) if rank else None

    def split(self, items: list[ScoreItem]) -> list[ItemScores]:
        out, lo = [], 0
        for it in items:
            hi = lo + it.n_scored
            k = it.top_k
            w = 0 if it.candidate_ids_T_C is None else it.candidate_ids_T_C.shape[1]
            out.append(ItemScores(
                logprobs_T=self.logprobs[lo:hi],
                top_ids_T_K=self.top_ids[lo:hi, :k] if k else None,
                top_logprobs_T_K=self.top_logprobs[lo:hi, :k] if k else None,
                candidate_logprobs_T_C=self.cands[lo:hi, :w] if w else None,
                entropy_T=self.entropy[lo:hi] if it.entropy else None,
                rank_T=self.rank[lo:hi] if it.rank else None))
            lo = hi
        return out
