"""Prefix-shared decoder forward for the torch engine, and the bounded prefix KV cache.

Sequences of one batch that share a prefix (a group of completions of one prompt) run the
prefix through the decoder once; each sequence's remainder then runs on that prefix's KV.
Across batches, a bounded LRU cache (OPD_PREFIX_CACHE_MB) keeps prefixes' KV and hidden
states, keyed by a hash of the token block (and checked token for token on a hit), so a
prompt scored a moment ago is not recomputed.

How `shared_hidden` runs a batch:
  1) plan: sort the sequences, chain neighbours with a long common prefix into groups; a
     group's prefix is their common prefix (each member keeps >= 1 token of its own); with the
     cache on, a lone sequence's prefix is its prompt (tokens before score_from); prefixes under
     16 tokens or under 15% of the sequence are not worth the second pass;
  2) resolve each group's prefix (a lone sequence is a group of one): a cache hit, or
     computed once (on a cached prompt if any) and cached;
  3) run every sequence's remainder on its prefix's KV in one forward (position ids continuing
     from each prefix's length); each layer's attention reads a group's prefix KV once for all
     its members (no per-member copy, and with GQA no per-query-head copy) and merges it with the
     member's own causal attention by log-sum-exp (`_Attend`, installed as the model's attention
     function by `install`);
  4) assemble right-padded hidden states [B, Lmax, H] exactly as an unshared forward gives
     them, and put new prefixes (capped at the prompt) into the cache.
Causal attention makes the KV of tokens[:P] a function of tokens[:P] alone, so reuse is exact
up to float rounding of a different matmul split (~1e-7 in float32). `install` turns sharing on
only after a probe shows the shared forward reproducing the plain one on the model itself (a body
whose layers drop the attention kwargs, e.g. StableLM's, fails it and runs unshared).

Who may touch the cache: only the engine thread that owns the engine (the batcher's); it is
not thread-safe and not shared between engines. It holds activations only (keys, values,
hidden states of token blocks), never results, tenants or requests. This module knows
nothing of the LM head, requests or wire formats.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from opd_services import metrics
from opd_services.teacher.engines.base import MIN_SHARED_PREFIX as MIN_PREFIX

# A prefix shorter than this share of its longest member saves less than the masked, two-pass
# forward costs (P4c, prompt 128 of 1,152 tokens: 0.94x in bench/prefix_cpu.py); it runs unshared.
MIN_SHARE = 0.15


SOURCES = ("computed", "batch", "cache")


def export_metrics(engine: str) -> None:
    """Create the per-engine series at start-up, so /metrics shows them before the first share."""
    for source in SOURCES:
        metrics.PREFIX_TOKENS.labels(engine, source)


@dataclass(slots=True)
class Prefix:
    """Activations of a token block: per-layer KV and the last hidden states."""

    tokens: np.ndarray                 # int64 [P]
    keys: list[torch.Tensor]           # per layer [kv_heads, P, head_dim]
    values: list[torch.Tensor]         # per layer [kv_heads, P, head_dim]
    hidden_P_H: torch.Tensor           # [P, H]

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        ts = [*self.keys, *self.values, self.hidden_P_H]
        return sum(t.numel() * t.element_size() for t in ts) + self.tokens.nbytes

    def head(self, n: int) -> "Prefix":
        """The first n positions, as tensors of their own (a slice would pin the whole batch)."""
        return _packed(self.tokens[:n], [k[:, :n] for k in self.keys], [v[:, :n] for v in self.values],
                       [self.hidden_P_H[:n]])


def block_key(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<i8").tobytes(), digest_size=16).digest()


class PrefixCache:
    """LRU of Prefix by token block, bounded in bytes; an entry over the budget is not kept."""

    def __init__(self, budget_bytes: int, engine: str = "torch"):
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, Prefix] = OrderedDict()
        self._bytes_gauge = metrics.PREFIX_CACHE_BYTES.labels(engine)
        self._hits = metrics.PREFIX_CACHE_LOOKUPS.labels(engine, "hit")
        self._misses = metrics.PREFIX_CACHE_LOOKUPS.labels(engine, "miss")
        self._bytes_gauge.set(0)

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, hit: bool) -> None:
        """Count one lookup (a prefix may take two gets: its whole length, then its prompt)."""
        (self._hits if hit else self._misses).inc()

    def get(self, tokens: np.ndarray) -> Prefix | None:
        key = block_key(tokens)
        hit = self._entries.get(key)
        if hit is not None and not np.array_equal(hit.tokens, tokens):
            hit = None                     # a hash collision: never serve another block's activations
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, prefix: Prefix) -> None:
        key, size = block_key(prefix.tokens), prefix.nbytes
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        if size > self.budget:
            return
        while self.bytes + size > self.budget:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
        self._entries[key] = prefix
        self.bytes += size
        self._bytes_gauge.set(self.bytes)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
        self._bytes_gauge.set(0)


@dataclass(slots=True)
class Group:
    members: list[int]       # batch indices
    length: int              # shared prefix length P (every member has >= P + 1 tokens)
    key_length: int          # what goes into / comes from the cache: min(P, the members' smallest score_from)


def plan(token_ids: list[np.ndarray], score_from: list[int], cache_on: bool) -> list[Group]:
    """Groups with a worthwhile prefix. Neighbours in sorted order join a group while that
    does not lower the group's saving ((n - 1) * P); lone sequences count only with the cache."""
    order = sorted(range(len(token_ids)), key=lambda i: token_ids[i].astype(">i8").tobytes())
    groups: list[list[int]] = []
    shared: list[int] = []
    for i in order:
        if groups:
            prev = groups[-1]
            p = min(shared[-1], _lcp(token_ids[prev[-1]], token_ids[i]))
            if p >= MIN_PREFIX and len(prev) * p >= (len(prev) - 1) * shared[-1]:
                prev.append(i)
                shared[-1] = p
                continue
        groups.append([i])
        shared.append(1 << 62)
    out = []
    for members, p in zip(groups, shared):
        p = min(p, *(token_ids[i].shape[0] - 1 for i in members))
        if len(members) == 1:
            if not cache_on:
                continue
            p = score_from[members[0]]
        if p >= MIN_PREFIX and p >= MIN_SHARE * max(token_ids[i].shape[0] for i in members):
            out.append(Group(members, p, min(p, *(score_from[i] for i in members))))
    return out


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.shape[0], b.shape[0])
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def concat(base: Prefix | None, tokens: np.ndarray, ext: "_Ext", n: int) -> Prefix:
    """base + the first n new positions of ext, packed into one buffer of its own."""
    if base is None:
        return _packed(tokens, [k[:, :n] for k in ext.keys], [v[:, :n] for v in ext.values], [ext.hidden_S_H[:n]])
    return _packed(tokens, [torch.cat([a, k[:, :n]], 1) for a, k in zip(base.keys, ext.keys)],
                   [torch.cat([a, v[:, :n]], 1) for a, v in zip(base.values, ext.values)],
                   [base.hidden_P_H, ext.hidden_S_H[:n]])


def _packed(tokens: np.ndarray, keys: list[torch.Tensor], values: list[torch.Tensor],
            hidden: list[torch.Tensor]) -> Prefix:
    """One allocation per entry (no slice pins a batch's tensors; less allocator fragmentation)."""
    hidden_P_H = hidden[0] if len(hidden) == 1 else torch.cat(hidden)
    parts = [*keys, *values, hidden_P_H]
    buf = parts[0].new_empty(sum(t.numel() for t in parts))
    views, lo = [], 0
    for t in parts:
        view = buf[lo: lo + t.numel()].view(t.shape)
        view.copy_(t)
        views.append(view)
        lo += t.numel()
    n = len(keys)
    return Prefix(tokens.copy(), views[:n], views[n:2 * n], views[-1])


@dataclass(slots=True)
class _Ext:
    """One row's new positions from `extend`: views into the batch's tensors."""

    hidden_S_H: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def extend(body, rows: list[tuple[Prefix | None, np.ndarray]], device: torch.device, want_kv: bool) -> list[_Ext]:
    """Run each row's tokens on its base prefix's KV (or from scratch), all rows in one forward:
    new tokens right-padded, position ids continuing from each base's length, and attention
    reading each distinct base prefix's KV once for all the rows on it (`_Attend`). Rows run
    ordered by base, so that each base's rows are one contiguous slice of the batch."""
    first: dict[int, int] = {}
    for r, (p, _) in enumerate(rows):
        first.setdefault(id(p), r)
    order = sorted(range(len(rows)), key=lambda r: first[id(rows[r][0])])
    rows = [rows[r] for r in order]
    base_n = [0 if p is None else p.n for p, _ in rows]
    new_n = [int(c.shape[0]) for _, c in rows]
    b, width = len(rows), max(new_n)
    ids = np.zeros((b, width), dtype=np.int64)
    for r, (_, chunk) in enumerate(rows):
        ids[r, : new_n[r]] = chunk
    positions_B_S = (torch.tensor(base_n)[:, None] + torch.arange(width)[None, :]).to(device)
    ctx = _Attend([p for p, _ in rows], want_kv)
    hidden_B_S_H = body(input_ids=torch.from_numpy(ids).to(device), position_ids=positions_B_S, use_cache=False,
                        opd_prefix=ctx).last_hidden_state
    if ctx.calls != body.config.num_hidden_layers:
        raise RuntimeError(f"prefix attention ran in {ctx.calls} of {body.config.num_hidden_layers} layers")
    out: list[_Ext] = [None] * b        # type: ignore[list-item]
    for r, orig in enumerate(order):
        out[orig] = _Ext(hidden_B_S_H[r], [k[r] for k in ctx.keys], [v[r] for v in ctx.values])
    return out


ATTENTION = "opd_prefix"


def install(model) -> str | None:
    """Route the model's attention through `prefix_attention` (plain SDPA unless a forward passes
    `opd_prefix`), then check on a probe that the shared forward gives the plain forward's hidden
    states. None once installed; otherwise why sharing cannot run on this model, and nothing changed:
    attention that is not plain causal SDPA (sliding window, logit soft-capping, another
    implementation), or a body that does not route `opd_prefix` to every layer's attention."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    why = _not_plain_sdpa(model.config)
    if why is not None:
        return why
    AttentionInterface.register(ATTENTION, prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    why = check_shared_forward(getattr(model, model.base_model_prefix))
    if why is not None:
        model.set_attn_implementation("sdpa")
    return why


def _not_plain_sdpa(config) -> str | None:
    if config._attn_implementation != "sdpa":
        return f"attention is {config._attn_implementation!r}, not plain causal SDPA"
    if getattr(config, "attn_logit_softcapping", None):
        return f"attention logits are soft-capped (attn_logit_softcapping={config.attn_logit_softcapping})"
    if getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return f"attention has a sliding window (sliding_window={getattr(config, 'sliding_window', None)})"
    return None


PROBE_TAIL = 4      # tokens of its own per probe sequence, after the shared MIN_PREFIX


def check_shared_forward(body) -> str | None:
    """Why the prefix-shared forward does not reproduce a plain forward on `body` (None when it does,
    within float rounding): two sequences sharing a MIN_PREFIX-token prefix, run as `shared_hidden`
    runs them (the prefix once, each tail on its KV), against one plain forward of both."""
    param = next(body.parameters())
    ids_B_L = np.random.default_rng(0).integers(0, body.config.vocab_size, (2, MIN_PREFIX + PROBE_TAIL))
    ids_B_L[1, :MIN_PREFIX] = ids_B_L[0, :MIN_PREFIX]
    with torch.inference_mode():
        want_B_L_H = body(input_ids=torch.from_numpy(ids_B_L).to(param.device), use_cache=False).last_hidden_state
        try:
            (ext,) = extend(body, [(None, ids_B_L[0, :MIN_PREFIX])], param.device, want_kv=True)
            base = concat(None, ids_B_L[0, :MIN_PREFIX], ext, MIN_PREFIX)
            tails = extend(body, [(base, ids_B_L[r, MIN_PREFIX:]) for r in range(2)], param.device, want_kv=False)
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as e:
            return f"the prefix-shared forward fails on this body ({type(e).__name__}: {e})"
    got_B_L_H = torch.stack([torch.cat([base.hidden_P_H, t.hidden_S_H]) for t in tails]).float()
    want_B_L_H = want_B_L_H.float()
    diff = float((got_B_L_H - want_B_L_H).abs().max())
    tol = torch.finfo(param.dtype).eps ** 0.5 * (1 + float(want_B_L_H.abs().max()))
    if not diff <= tol:
        return f"the prefix-shared forward differs from the plain one by {diff:.3g} (> {tol:.2g}) on a probe"
    return None


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, opd_prefix=None, **kw):
    """transformers attention function: SDPA, or with `opd_prefix` (an `_Attend`) the rows' own
    causal attention merged with attention over their base prefixes."""
    if opd_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    if kw.get("sliding_window") or kw.get("softcap"):       # install() keeps such models off this path
        raise RuntimeError("prefix attention supports plain causal attention only")
    return opd_prefix.attend(module, query, key, value, scaling), None


class _Attend:
    """One `extend` forward's attention over base prefixes, in every layer. Each distinct prefix
    is read once for all its rows (their queries stacked), never copied per row: attention over
    [prefix; own tokens] is the log-sum-exp merge of attention over the prefix (every query sees
    all of it) and causal attention over the row's own tokens (trailing padding is never seen)."""

    def __init__(self, bases: list[Prefix | None], want_kv: bool):
        self.groups: list[tuple[Prefix, int, int]] = []      # (prefix, first row, end row): rows sorted by base
        for r, p in enumerate(bases):
            if p is None:
                continue
            if self.groups and self.groups[-1][0] is p:
                self.groups[-1] = (p, self.groups[-1][1], r + 1)
            else:
                self.groups.append((p, r, r + 1))
        self.want_kv = want_kv
        self.keys: list[torch.Tensor] = []        # per layer [B, kv_heads, S, head_dim], when want_kv
        self.values: list[torch.Tensor] = []
        self.calls = 0

    def attend(self, module, q_B_h_S_d, k_B_k_S_d, v_B_k_S_d, scale) -> torch.Tensor:
        """GQA (kv_heads < heads) reads each KV head for its query heads as it is: no KV is repeated."""
        self.calls += 1
        if self.want_kv:
            self.keys.append(k_B_k_S_d)
            self.values.append(v_B_k_S_d)
        scale = scale if scale is not None else q_B_h_S_d.shape[-1] ** -0.5
        out_B_h_S_d, lse_B_h_S = _attention(q_B_h_S_d, k_B_k_S_d, v_B_k_S_d, True, scale)
        for prefix, lo, hi in self.groups:
            q = q_B_h_S_d[lo:hi]
            n, h, s, d = q.shape
            kp_1_k_P_d = prefix.keys[module.layer_idx][None]
            vp_1_k_P_d = prefix.values[module.layer_idx][None]
            o, lse = _attention(q.transpose(0, 1).reshape(1, h, n * s, d), kp_1_k_P_d, vp_1_k_P_d, False, scale)
            pre_o = o.reshape(h, n, s, d).transpose(0, 1).contiguous()
            pre_lse = lse.reshape(h, n, s).transpose(0, 1).contiguous()
            own_o, own_lse = out_B_h_S_d[lo:hi], lse_B_h_S[lo:hi]     # views: merged in place
            top = torch.maximum(own_lse, pre_lse)
            w_own, w_pre = (own_lse - top).exp_(), pre_lse.sub_(top).exp_()
            total = w_own + w_pre
            own_o.mul_(w_own.div_(total)[..., None].to(own_o.dtype))
            own_o.add_(pre_o.mul_(w_pre.div_(total)[..., None].to(own_o.dtype)))
        return out_B_h_S_d.transpose(1, 2).contiguous()


def _attention(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale [causal]) v and its log-sum-exp per query, [B, h, S, d] and [B, h, S],
    for k, v of [B, kv_heads, T, d]: query head j reads KV head j // (h / kv_heads) (GQA, as
    transformers' repeat_kv), with no KV repeated. On CPU torch's flash kernel (it takes GQA as
    is); elsewhere the plain formula (materialises the scores)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return _attention_formula(q, k, v, causal, scale)


def _attention_formula(q_B_h_S_d, k_B_k_T_d, v_B_k_T_d, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain formula, GQA by grouping: a KV head's query heads are stacked along the sequence
    ([B, kv, rep * S, d]), so each KV head is read once by one matmul for all of them."""
    b, h, s, d = q_B_h_S_d.shape
    kv, t = k_B_k_T_d.shape[1], k_B_k_T_d.shape[2]
    q_B_k_RS_d = q_B_h_S_d.reshape(b, kv, (h // kv) * s, d)
    scores = (q_B_k_RS_d @ k_B_k_T_d.transpose(-1, -2)).float() * scale
    if causal:
        future_S_T = torch.ones(s, t, dtype=torch.bool, device=scores.device).triu(1)
        scores.masked_fill_(future_S_T.repeat(h // kv, 1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = (scores - lse[..., None]).exp().to(v_B_k_T_d.dtype) @ v_B_k_T_d
    return out.view(b, h, s, d), lse.view(b, h, s)


class _Resolved:
    """Per batch: each sequence's base prefix, the prefixes to compute once, the token counts."""

    def __init__(self, n: int):
        self.base: list[Prefix | None] = [None] * n
        self.todo: list[tuple[Group, Prefix | None]] = []     # (group, cached prompt to start from)
        self.tokens = dict.fromkeys(SOURCES, 0)


def _resolve(groups: list[Group], ids: list[np.ndarray], cache: PrefixCache | None) -> _Resolved:
    res = _Resolved(len(ids))
    for g in groups:
        rep = ids[g.members[0]]
        hit = part = None
        if cache is not None:
            hit = cache.get(rep[: g.length])
            if hit is None and g.key_length < g.length:
                part = cache.get(rep[: g.key_length])
            cache.record(hit is not None or part is not None)
        reused = g.length if hit else (part.n if part else 0)
        res.tokens["cache"] += reused
        res.tokens["computed"] += g.length - reused
        res.tokens["batch"] += (len(g.members) - 1) * g.length
        if hit is not None:
            for i in g.members:
                res.base[i] = hit
        else:
            res.todo.append((g, part))
    return res


def shared_hidden(body, token_ids: list[np.ndarray], score_from: list[int], cache: PrefixCache | None,
                  device: torch.device, engine: str = "torch") -> torch.Tensor | None:
    """Right-padded last hidden states [B, Lmax, H] of the batch computed with shared prefixes,
    or None when nothing in it is worth sharing (the caller runs its plain forward)."""
    # 1) plan
    groups = plan(token_ids, score_from, cache is not None)
    if not groups:
        return None
    # 2) resolve prefixes: cache hits, else compute each group's prefix once
    res = _resolve(groups, token_ids, cache)
    if res.todo:
        rows = [(part, token_ids[g.members[0]][(part.n if part else 0): g.length]) for g, part in res.todo]
        for (g, part), ext in zip(res.todo, extend(body, rows, device, want_kv=True)):
            rep = token_ids[g.members[0]]
            pre = concat(part, rep[: g.length], ext, g.length - (part.n if part else 0))
            for i in g.members:
                res.base[i] = pre
            if cache is not None:
                cache.put(pre if g.key_length == g.length else pre.head(g.key_length))
    # 3) every sequence's remainder on its prefix's KV (a miss computed its prefix in 2), so a
    #    later hit runs this same forward on the same KV and returns the same numbers)
    rows = [(p, ids[(p.n if p else 0):]) for p, ids in zip(res.base, token_ids)]
    exts = extend(body, rows, device, want_kv=False)
    # 4) assemble as an unshared forward would
    lens = [int(t.shape[0]) for t in token_ids]
    h = exts[0].hidden_S_H
    hidden_BL_H = h.new_zeros((len(lens), max(lens), h.shape[-1]))
    for i, (p, ext) in enumerate(zip(res.base, exts)):
        b = p.n if p else 0
        if b:
            hidden_BL_H[i, :b] = p.hidden_P_H
        hidden_BL_H[i, b: lens[i]] = ext.hidden_S_H[: lens[i] - b]
    for source, n in res.tokens.items():
        if n:
            metrics.PREFIX_TOKENS.labels(engine, source).inc(n)
    return hidden_BL_H
