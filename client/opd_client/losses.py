"""OPD losses in torch: turn teacher scores into a per-token training signal for the student.

Three families, all per token over the completion positions a mask selects:

* `reverse_kl_pg_loss`: the student's sampled tokens only. The per-token reverse KL
  estimate  k_t = log pi_behaviour(y_t) - log p_teacher(y_t)  is the (negative) advantage
  of a policy-gradient step; rollouts sampled by an older policy are corrected with the
  importance ratio pi_theta / pi_behaviour, clipped PPO-style. Needs only the teacher's
  logprob of each sampled token (the cheapest thing the teacher returns).
* `forward_kl_topk_loss`: KL(teacher || student) over the teacher's top-k ids plus one
  "tail" bucket that holds the rest of the vocabulary's mass, on both sides.
* `jsd_topk_loss`: generalised Jensen-Shannon divergence with weight beta over the same
  k + 1 buckets (GKD): beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q.
* `full_divergence_loss`: per-position forward KL, reverse KL or JSD(beta) over the whole
  vocabulary (GKD's on-policy losses), from the teacher's top-k with k up to V: exact when
  k = V; with k < V the tail mass is spread evenly over the ids the teacher did not return.

Shapes: B = sequences, T = scored positions (completion tokens), V = vocabulary,
K = teacher top-k. Every function returns `LossOutput(loss, metrics)`; `loss` is a scalar
tensor averaged over masked-in tokens.

torch is an optional extra of opd-client (`pip install opd-client[torch]`); importing this
module without it works, calling a loss raises an ImportError that says so. This module
does not sample, call the teacher, or step an optimizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

try:
    import torch
except ImportError:  # torch is optional for opd-client; the losses need it
    torch = None

if TYPE_CHECKING:
    from torch import Tensor

LOG_EPS = -30.0      # log of "no mass": floor for tail buckets that round to zero


@dataclass
class LossOutput:
    loss: "Tensor"
    metrics: dict[str, float] = field(default_factory=dict)


def _need_torch() -> None:
    if torch is None:
        raise ImportError("opd_client.losses needs torch: pip install 'opd-client[torch]'")


def masked_mean(x_B_T: "Tensor", mask_B_T: "Tensor") -> "Tensor":
    mask = mask_B_T.to(x_B_T.dtype)
    return (x_B_T * mask).sum() / mask.sum().clamp_min(1.0)


def token_logprobs(logits_B_T_V: "Tensor", token_ids_B_T: "Tensor") -> "Tensor":
    """log softmax(logits)[token] per position, in float32: [B, T]."""
    _need_torch()
    lp = torch.log_softmax(logits_B_T_V.float(), dim=-1)
    return lp.gather(-1, token_ids_B_T.long().unsqueeze(-1)).squeeze(-1)


# ---- reverse KL on sampled tokens, as a policy-gradient advantage ----------------------


def reverse_kl_pg_loss(logprobs_B_T: "Tensor", behaviour_logprobs_B_T: "Tensor", teacher_logprobs_B_T: "Tensor",
                       mask_B_T: "Tensor", *, clip_eps: float = 0.0, kl_coef: float = 1.0,
                       baseline: bool = False, normalise: bool = False) -> LossOutput:
    """Policy-gradient step with advantage -(log pi_behaviour - log p_teacher) per token.

    logprobs_B_T: the current student's logprobs of the sampled tokens (with grad).
    behaviour_logprobs_B_T: the sampling policy's logprobs of the same tokens (no grad),
    as recorded in the rollout. On-policy (ratio 1) the gradient's expectation over the
    student's samples is exactly the gradient of KL(student || teacher) at each position.
    Stale rollouts: the importance ratio exp(logprobs - behaviour) reweights them. The
    published recipe (Thinking Machines' on-policy distillation: per-token advantage, discount
    0, plain importance sampling, no baseline, no normalisation) is the default; clip_eps > 0
    clips the ratio to [1-eps, 1+eps] in the pessimistic PPO form instead.
    baseline: subtract the batch's mean advantage (over masked tokens). The expected gradient
    is unchanged (E[grad log pi] = 0) and its variance drops.
    normalise: also divide the advantages by their standard deviation (over masked tokens);
    this rescales the step, so it changes the effective learning rate.
    """
    _need_torch()
    lp = logprobs_B_T.float()
    beh = behaviour_logprobs_B_T.detach().float()
    kl_B_T = beh - teacher_logprobs_B_T.detach().float()
    adv_B_T = -kl_coef * kl_B_T
    if baseline:
        adv_B_T = adv_B_T - masked_mean(adv_B_T, mask_B_T)
    if normalise:
        centred_B_T = adv_B_T - masked_mean(adv_B_T, mask_B_T)
        adv_B_T = adv_B_T / masked_mean(centred_B_T ** 2, mask_B_T).sqrt().clamp_min(1e-6)
    ratio_B_T = torch.exp(lp - beh)
    clipped_B_T = ratio_B_T.clamp(1.0 - clip_eps, 1.0 + clip_eps) if clip_eps > 0 else ratio_B_T
    obj_B_T = torch.minimum(ratio_B_T * adv_B_T, clipped_B_T * adv_B_T)
    loss = -masked_mean(obj_B_T, mask_B_T)
    with torch.no_grad():
        clip_frac = masked_mean(((ratio_B_T - clipped_B_T).abs() > 0).float(), mask_B_T)
        metrics = {"reverse_kl": float(masked_mean(kl_B_T, mask_B_T)),
                   "ratio_mean": float(masked_mean(ratio_B_T, mask_B_T)), "clip_frac": float(clip_frac)}
    return LossOutput(loss, metrics)


# ---- divergences over the teacher's top-k plus a tail bucket --------------------------


def topk_buckets(student_logprobs_B_T_V: "Tensor", top_ids_B_T_K: "Tensor",
                 top_logprobs_B_T_K: "Tensor") -> tuple["Tensor", "Tensor"]:
    """(teacher, student) log-distributions over K + 1 buckets: the teacher's top-k ids, then
    the tail (every other id). The student's tail is exact (a logsumexp over the rest of its
    vocabulary); the teacher's is 1 - sum(top-k), floored at exp(LOG_EPS)."""
    _need_torch()
    lq_full = student_logprobs_B_T_V.float()
    ids = top_ids_B_T_K.long()
    lq_top = lq_full.gather(-1, ids)
    in_top = torch.zeros_like(lq_full, dtype=torch.bool).scatter_(-1, ids, True)
    lq_tail = torch.logsumexp(lq_full.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True)
    lq_tail = lq_tail.clamp_min(LOG_EPS)     # k = V: no tail; keep it finite (its p is ~0)
    lp_top = top_logprobs_B_T_K.detach().float()
    p_tail = (1.0 - lp_top.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    lp_tail = torch.log(p_tail).clamp_min(LOG_EPS)
    return torch.cat([lp_top, lp_tail], -1), torch.cat([lq_top, lq_tail], -1)


def _kl(lp_B_T_N: "Tensor", lq_B_T_N: "Tensor") -> "Tensor":
    """KL(p || q) over the last axis, from log-probabilities; 0 * log 0 counts as 0."""
    p = lp_B_T_N.exp()
    return torch.where(p > 0, p * (lp_B_T_N - lq_B_T_N), torch.zeros_like(p)).sum(-1)


def forward_kl_topk_loss(student_logprobs_B_T_V: "Tensor", top_ids_B_T_K: "Tensor", top_logprobs_B_T_K: "Tensor",
                         mask_B_T: "Tensor") -> LossOutput:
    """KL(teacher || student) over the teacher's top-k + tail, averaged over masked tokens."""
    lp, lq = topk_buckets(student_logprobs_B_T_V, top_ids_B_T_K, top_logprobs_B_T_K)
    kl_B_T = _kl(lp, lq)
    loss = masked_mean(kl_B_T, mask_B_T)
    return LossOutput(loss, {"forward_kl": float(loss.detach())})


def generalized_jsd(lp_B_T_N: "Tensor", lq_B_T_N: "Tensor", beta: float) -> "Tensor":
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; per position."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be strictly between 0 and 1, got {beta!r}")
    lm = torch.logsumexp(torch.stack([lp_B_T_N + math.log(beta), lq_B_T_N + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(lp_B_T_N, lm) + (1.0 - beta) * _kl(lq_B_T_N, lm)


def jsd_topk_loss(student_logprobs_B_T_V: "Tensor", top_ids_B_T_K: "Tensor", top_logprobs_B_T_K: "Tensor",
                  mask_B_T: "Tensor", *, beta: float = 0.5) -> LossOutput:
    """Generalised JSD(beta) between teacher and student over the teacher's top-k + tail."""
    lp, lq = topk_buckets(student_logprobs_B_T_V, top_ids_B_T_K, top_logprobs_B_T_K)
    loss = masked_mean(generalized_jsd(lp, lq, beta), mask_B_T)
    return LossOutput(loss, {"jsd": float(loss.detach())})


# ---- divergences over the whole vocabulary (GKD) ----------------------------------------

FULL_KINDS = ("fkl", "rkl", "jsd")


def dense_teacher_logprobs(top_ids_B_T_K: "Tensor", top_logprobs_B_T_K: "Tensor", vocab_size: int) -> "Tensor":
    """[B, T, V] teacher log-distribution from its top-k: exact when K = V; otherwise the mass
    the top-k leave out (1 - sum, floored at exp(LOG_EPS)) is spread evenly over the other ids."""
    _need_torch()
    lp_top = top_logprobs_B_T_K.detach().float()
    k = lp_top.shape[-1]
    if k >= vocab_size:
        return torch.full(lp_top.shape[:-1] + (vocab_size,), LOG_EPS).scatter(-1, top_ids_B_T_K.long(), lp_top)
    p_tail = (1.0 - lp_top.exp().sum(-1, keepdim=True)).clamp_min(math.exp(LOG_EPS))
    rest = torch.log(p_tail / (vocab_size - k)).expand(*lp_top.shape[:-1], vocab_size)
    return rest.clone().scatter(-1, top_ids_B_T_K.long(), lp_top)


def full_divergence_loss(student_logprobs_B_T_V: "Tensor", teacher_logprobs_B_T_V: "Tensor", mask_B_T: "Tensor",
                         *, kind: str = "rkl", beta: float = 0.5) -> LossOutput:
    """Per-position divergence between teacher p and student q over the whole vocabulary,
    averaged over masked tokens: fkl = KL(p || q), rkl = KL(q || p) (exact, no sampling
    variance: the analytic counterpart of `reverse_kl_pg_loss`), jsd = generalised JSD(beta)."""
    _need_torch()
    lq = student_logprobs_B_T_V.float()
    lp = teacher_logprobs_B_T_V.detach().float()
    if kind == "fkl":
        div_B_T = _kl(lp, lq)
    elif kind == "rkl":
        div_B_T = _kl(lq, lp)
    elif kind == "jsd":
        div_B_T = generalized_jsd(lp, lq, beta)
    else:
        raise ValueError(f"kind must be one of {FULL_KINDS}, got {kind!r}")
    loss = masked_mean(div_B_T, mask_B_T)
    with torch.no_grad():
        metrics = {f"full_{kind}": float(loss), "reverse_kl": float(masked_mean(_kl(lq, lp), mask_B_T))}
    return LossOutput(loss, metrics)


def sft_loss(student_logprobs_B_T: "Tensor", mask_B_T: "Tensor") -> LossOutput:
    """Cross-entropy on given (e.g. teacher-sampled) tokens: the SFT baseline."""
    loss = -masked_mean(student_logprobs_B_T.float(), mask_B_T)
    return LossOutput(loss, {"nll": float(loss.detach())})
