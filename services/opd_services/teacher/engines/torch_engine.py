"""Torch engine: exact teacher logprobs from a transformers causal LM, on CPU or CUDA.

How it scores a batch:
  1) right-pad the sequences and run the decoder body once (no LM head); sequences that share a
     prefix run it once and the rest on its KV, and prefixes come from the prefix KV cache
     when they are there (engines/prefix.py; the hidden states are the same);
  2) gather only the hidden states that predict positions [s, L) of each sequence;
  3) push those rows through the LM head in chunks, each chunk's logits in float32 (a bfloat16 /
     float16 model's head matmul included: `Float32Head`): log-softmax statistics, the target
     logprob, top-k, candidates and entropy;
  4) split the rows back per sequence.
The full [batch, length, vocab] logits tensor is never built. Causal attention means right
padding cannot change any real position's result.

The head is the model's own `forward()`, run on a copy of the model whose base model
(`getattr(model, model.base_model_prefix)`) is a stub returning the given hidden states
(`_GivenHidden`): the architecture's own code applies the output embedding and whatever follows
it (Granite's logit scaling, Cohere's logit scale, Gemma's soft-capping, anything else), so no
transform is listed by architecture name here. At start a probe compares the whole scoring path
with `model.forward().logits` and the engine refuses to start (ConfigError) where they disagree
beyond float rounding, or where the model has no base model / output embeddings to drive.
Generation (`generate`) is delegated to opd_services.modeling.sampling (KV-cached, left-padded),
which runs the same `forward()`: the teacher samples from the distribution it scores.
This module does not validate requests, batch them, or know about any wire format.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import numpy as np
import torch

from opd_client.types import ModelInfo
from opd_services.errors import ConfigError
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
    one unshared P4a batch from 2,500 to 3,160 tokens/s (bench/RESULTS.md, "Engine changes
    behind the P4 figures"); vLLM's CPU backend uses
    oneDNN too. Same weights, same module (its class is swapped in place); results differ from
    MKL's by float32 rounding (~3e-6 on unit-scale outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_linears(model: torch.nn.Module) -> bool:
    """Swap every nn.Linear of a float32 CPU model to OneDnnLinear, if oneDNN is there and agrees
    with torch's own matmul on a probe; False (nothing changed) otherwise. Inference only: the op
    has no autograd, so only the teacher's engine uses it."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if not linears or linears[0].weight.device.type != "cpu" or linears[0].weight.dtype != torch.float32:
        return False
    if not onednn_available():
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


class _GivenHidden(torch.nn.Module):
    """Stands in for a causal LM's base model: returns the hidden states it is handed as
    `inputs_embeds` as `last_hidden_state`, in the base model's own output class (its other
    fields None), so that the causal LM's `forward()` runs only what follows its body."""

    def __init__(self, output_cls: type):
        super().__init__()
        self.output_cls = output_cls

    def forward(self, *args, inputs_embeds: torch.Tensor | None = None, **kwargs):
        return self.output_cls(last_hidden_state=inputs_embeds)


def model_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base model, output embeddings) of a causal LM, or ConfigError naming what is missing."""
    arch = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "") or ""
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, torch.nn.Module) or body is model:
        raise ConfigError(f"torch engine: {arch} has no base model under base_model_prefix={prefix!r}, so the "
                          f"engine cannot run its decoder without the LM head; serve it with OPD_ENGINE=vllm")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Module) or getattr(head, "weight", None) is None or head.weight.dim() != 2:
        raise ConfigError(f"torch engine: {arch} has no output embeddings (get_output_embeddings() is {head!r}), "
                          f"so the engine cannot score it; serve it with OPD_ENGINE=vllm")
    return body, head


class Float32Head(torch.nn.Module):
    """A bfloat16 / float16 model's nn.Linear LM head, computing its logits in float32: the same
    weights, each logit the float32 sum of the exact products of the model's 16-bit hidden states
    and weights (a 16-bit matmul rounds every logit to the model's dtype: to 8 bits in bfloat16,
    ~0.03 on a logit of 8). What forward() does after its head (soft-capping, scaling) then runs
    in float32 too. On CUDA the 16-bit matmul returns float32 itself (torch.mm's out_dtype: tensor
    cores, no copy of the weight); elsewhere both sides are upcast, the weight once per batch
    (`batch`), as a CPU has no 16-bit matmul returning float32; with `onednn` (set by the engine on
    CPU) that float32 matmul is oneDNN's, 1.7x MKL's on the 2-core AMD VM (vocab 152k, hidden 1024).
    The cost on that VM: the head takes 1.5-1.8x a bfloat16 head's time (a chunk reads twice the
    bytes of weight); a whole bfloat16 batch (8 x 512 tokens, 2,048 scored) 1.17x on the bench
    model's shape (vocab 32k, hidden 256), 1.37x at vocab 152k, hidden 512."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self.native = linear.weight.device.type == "cuda" and _mm_returns_float32(linear.weight)
        self.onednn = False
        self._weight32: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @contextlib.contextmanager
    def batch(self):
        """Within it, every chunk reuses one float32 copy of the weight (where it is upcast)."""
        if not self.native:
            self._weight32 = self.linear.weight.float()
        try:
            yield
        finally:
            self._weight32 = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        bias = None if self.linear.bias is None else self.linear.bias.float()
        if self.native:
            x_N_H = hidden.reshape(-1, hidden.shape[-1]).to(w.dtype)
            logits = torch.mm(x_N_H, w.t(), out_dtype=torch.float32).view(*hidden.shape[:-1], w.shape[0])
            return logits if bias is None else logits + bias
        w32 = self._weight32 if self._weight32 is not None else w.float()
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(hidden.float(), w32, bias, "none", [], "")
        return torch.nn.functional.linear(hidden.float(), w32, bias)


def _mm_returns_float32(weight: torch.Tensor) -> bool:
    """Whether torch.mm(out_dtype=float32) runs on this 16-bit weight's device and gives the float32
    sums (checked on a probe against float64: a result rounded to 16 bits fails it)."""
    x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        w = weight[:256]
        try:
            got = torch.mm(x, w.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            return False
        want = x.double() @ w.double().t()
    return got.dtype == torch.float32 and bool(torch.allclose(got.double(), want, rtol=1e-4,
                                                              atol=1e-4 * float(want.abs().max())))


def _swapped(module: torch.nn.Module, path: list[str], new: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `module` with its submodule at `path` replaced by `new`; every module on
    the way is copied the same way, so `module` itself is not changed."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._modules[path[0]] = new if len(path) == 1 else _swapped(module._modules[path[0]], path[1:], new)
    return out


def head_model(model, body_output_cls: type) -> torch.nn.Module:
    """A shallow copy of `model` (same modules and weights, the LM head included) whose base model
    is `_GivenHidden`: its `forward(inputs_embeds=hidden_1_n_H).logits` are the model's logits for
    those hidden states, in float32 (a 16-bit nn.Linear head runs as `Float32Head`). The model
    itself is not changed (generation keeps running it)."""
    prefix = model.base_model_prefix
    head = _swapped(model, [prefix], _GivenHidden(body_output_cls))
    out = model.get_output_embeddings()
    if type(out) is torch.nn.Linear and out.weight.dtype in (torch.bfloat16, torch.float16):
        path = next(name for name, m in model.named_modules() if m is out).split(".")
        if path[0] != prefix:
            head = _swapped(head, path, Float32Head(out))
    return head


PROBE_TOKENS = 8          # the head probe: every vocabulary entry's logprob at 7 positions
ATTENTION_PROBE = 32      # the attention probe: longer than the tiny test models' sliding windows


class TorchEngine:
    """Exact teacher scores from a transformers causal LM: the decoder body over the batch (prefixes
    shared where the attention allows), then the model's own `forward()` after its body (see
    `head_model`) on the scored rows only, chunked, in float32. Refuses to start (ConfigError) where a
    probe of that path disagrees with `model.forward().logits`."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: str = "auto",
                 max_top_k: int = 20, name: str | None = None, prefix_cache_mb: float = 0,
                 share_prefixes: bool = True, cpu_onednn: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device, model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        self.onednn = cpu_onednn and use_onednn_linears(self.model)
        self.body, self.head = model_parts(self.model)
        self.vocab_size = int(self.head.weight.shape[0])
        self.chunk_rows = max(16, CHUNK_BYTES // (4 * self.vocab_size))
        self._exact_attention(Path(model_dir).name)
        self.head_model = head_model(self.model, self._body_output_cls())
        self.head32 = next((m for m in self.head_model.modules() if isinstance(m, Float32Head)), None)
        if self.head32 is not None and not self.head32.native:
            self.head32.onednn = cpu_onednn and self.device.type == "cpu" and onednn_available()
        self.share_prefixes = False
        self.prefix_cache = None
        self._check_head(Path(model_dir).name)
        why = install(self.model) if share_prefixes else None
        if why is not None:
            log.warning("torch engine: prefix sharing is off for %s: %s", Path(model_dir).name, why)
        self.share_prefixes = share_prefixes and why is None
        if self.share_prefixes:
            export_metrics("torch")
        if self.share_prefixes and prefix_cache_mb > 0:
            self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20)))
        self.info = ModelInfo(
            name=name or Path(model_dir).resolve().name, engine="torch", engine_version=torch.__version__,
            dtype=str(self.dtype).removeprefix("torch."), revision=revision_hash(model_dir),
            vocab_size=self.vocab_size, max_model_len=int(getattr(config, "max_position_embeddings", 4096)),
            max_top_k=max_top_k)
        log.info("torch engine: %s on %s (%s), vocab %d, prefix sharing %s, prefix cache %s MB, linears %s",
                 self.info.name, self.device, self.info.dtype, self.vocab_size, "on" if self.share_prefixes else "off",
                 prefix_cache_mb if self.prefix_cache else 0, "oneDNN" if self.onednn else "torch default")

    def _probe_ids(self, n: int = PROBE_TOKENS) -> np.ndarray:
        return np.random.default_rng(0).integers(0, self.vocab_size, n).astype(np.int64)

    @torch.inference_mode()
    def _exact_attention(self, name: str) -> None:
        """Keep the loaded attention implementation only where it computes what transformers' eager
        (reference) attention does: some features have no SDPA path and are dropped silently (in
        transformers 5.19, Gemma-2's attn_logit_softcapping). Compared on a probe; eager otherwise."""
        impl = self.model.config._attn_implementation
        if impl == "eager":
            return
        ids_1_L = torch.from_numpy(self._probe_ids(ATTENTION_PROBE)[None]).to(self.device)
        got_L_H = self.body(input_ids=ids_1_L, use_cache=False).last_hidden_state[0].float()
        self.model.set_attn_implementation("eager")
        want_L_H = self.body(input_ids=ids_1_L, use_cache=False).last_hidden_state[0].float()
        diff = float((got_L_H - want_L_H).abs().max())
        tol = 64 * torch.finfo(self.dtype).eps * (1 + float(want_L_H.abs().max()))
        if diff <= tol:
            self.model.set_attn_implementation(impl)
            return
        log.warning("torch engine: %s's %r attention differs from eager attention by %.3g (> %.2g) on a probe "
                    "(a feature it does not implement, e.g. attention soft-capping); using eager attention",
                    name, impl, diff, tol)

    @torch.inference_mode()
    def _body_output_cls(self) -> type:
        out = self.body(input_ids=torch.from_numpy(self._probe_ids()[None]).to(self.device), use_cache=False)
        if getattr(out, "last_hidden_state", None) is None:
            raise ConfigError(f"torch engine: {type(self.model).__name__}'s base model returns {type(out).__name__} "
                              f"without last_hidden_state; the engine cannot drive it: serve it with OPD_ENGINE=vllm")
        return type(out)

    @torch.inference_mode()
    def _check_head(self, name: str) -> None:
        """Probe: the scoring path (body, row gather, chunked head, log-softmax) against a float64
        log-softmax of `model.forward().logits` over the whole vocabulary; ConfigError beyond rounding."""
        arch = type(self.model).__name__
        ids_L = self._probe_ids()
        want_L_V = self.model(input_ids=torch.from_numpy(ids_L[None]).to(self.device), use_cache=False).logits[0]
        if want_L_V.shape[-1] != self.vocab_size:
            raise ConfigError(f"torch engine: {arch} ({name}): forward() returns {want_L_V.shape[-1]} logits per "
                              f"position but its output embeddings have {self.vocab_size} rows; the engine cannot "
                              f"score it: serve it with OPD_ENGINE=vllm")
        ref_T_V = torch.log_softmax(want_L_V[:-1].double(), dim=-1).cpu().numpy()
        cands_T_V = np.broadcast_to(np.arange(self.vocab_size, dtype=np.int64), (PROBE_TOKENS - 1, self.vocab_size))
        try:
            (got,) = self.score([ScoreItem(ids_L, 1, candidate_ids_T_C=np.ascontiguousarray(cands_T_V))])
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ConfigError(f"torch engine: {arch} ({name}) cannot run its forward() on given hidden states "
                              f"({type(e).__name__}: {e}); the engine cannot score it: serve it with "
                              f"OPD_ENGINE=vllm") from e
        diff = float(np.abs(got.candidate_logprobs_T_C - ref_T_V).max())
        tol = 1e-4 + 4 * torch.finfo(self.dtype).eps * (1 + float(want_L_V.abs().max()))
        if not diff <= tol:
            raise ConfigError(
                f"torch engine: {arch} ({name}): the engine's logprobs differ from its forward() by up to {diff:.3g} "
                f"(tolerance {tol:.2g}) on a probe of {PROBE_TOKENS} tokens: forward() computes its logits from "
                f"more than what its base model returns (e.g. from input_ids), which the engine's head path cannot see. "
                f"Serve it with OPD_ENGINE=vllm, or make forward()'s logits a function of the base model's "
                f"last_hidden_state")

    def close(self) -> None:
        self.model = self.body = self.head = self.head_model = self.head32 = None
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
        with self.head32.batch() if self.head32 is not None else contextlib.nullcontext():
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
        logits_n_V = self.head_model(inputs_embeds=hidden_n_H[None]).logits[0].float()
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
