"""From scored rollouts (or teacher samples) to one loss: padded tensors, student forward, loss.

Axes: B = rollouts in the step, L = padded sequence length, T = padded scored positions
(position score_from + t), V = vocabulary, K = teacher top-k. Sequences are right-padded;
causal attention means padding never changes a real position, so only the loss is masked.
This module does no I/O: it neither samples nor talks to the teacher or the queue.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opd_client.losses import (LossOutput, dense_teacher_logprobs, forward_kl_topk_loss, full_divergence_loss,
                               jsd_topk_loss, reverse_kl_pg_loss, sft_loss, token_logprobs)
from opd_client.types import ScoredRollout
from opd_services.tasks.addition import PAD


@dataclass
class Batch:
    ids_B_L: torch.Tensor
    pos_B_T: torch.Tensor            # position of the hidden state that predicts scored token t
    targets_B_T: torch.Tensor
    mask_B_T: torch.Tensor           # loss mask (0 on padding and on tokens not trained on)
    behaviour_B_T: torch.Tensor | None = None
    teacher_B_T: torch.Tensor | None = None
    top_ids_B_T_K: torch.Tensor | None = None
    top_lp_B_T_K: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.mask_B_T.sum())


def _layout(seqs: list[np.ndarray], starts: list[int]) -> Batch:
    b = len(seqs)
    lmax = max(len(s) for s in seqs)
    tmax = max(len(s) - st for s, st in zip(seqs, starts))
    ids = np.full((b, lmax), PAD, dtype=np.int64)
    pos = np.zeros((b, tmax), dtype=np.int64)
    mask = np.zeros((b, tmax), dtype=np.float32)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = s
        t = len(s) - st
        pos[i, :t] = np.arange(st - 1, len(s) - 1)
        mask[i, :t] = 1
    ids_t = torch.from_numpy(ids)
    pos_t = torch.from_numpy(pos)
    return Batch(ids_B_L=ids_t, pos_B_T=pos_t, targets_B_T=ids_t.gather(1, (pos_t + 1).clamp_max(lmax - 1)),
                 mask_B_T=torch.from_numpy(mask))


def _pad_rows(rows: list[np.ndarray], tmax: int, fill=0.0, dtype=np.float32) -> torch.Tensor:
    shape = (len(rows), tmax) + rows[0].shape[1:]
    out = np.full(shape, fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def scored_batch(scored: list[ScoredRollout]) -> Batch:
    rolls = [s.rollout for s in scored]
    batch = _layout([r.token_ids.astype(np.int64) for r in rolls], [r.score_from for r in rolls])
    tmax = batch.mask_B_T.shape[1]
    batch.mask_B_T *= _pad_rows([r.loss_mask.astype(np.float32) for r in rolls], tmax)
    batch.behaviour_B_T = _pad_rows([r.behaviour_logprobs for r in rolls], tmax)
    batch.teacher_B_T = _pad_rows([s.teacher_logprobs for s in scored], tmax)
    if scored[0].top_ids is not None:
        batch.top_ids_B_T_K = _pad_rows([s.top_ids for s in scored], tmax, 0, np.int64)
        batch.top_lp_B_T_K = _pad_rows([s.top_logprobs for s in scored], tmax, 0.0)
    return batch


def sequence_batch(seqs: list[np.ndarray], starts: list[int]) -> Batch:
    """For SFT: sequences whose tokens from `start` on are the targets."""
    return _layout(seqs, starts)


def student_logprobs(model, batch: Batch) -> torch.Tensor:
    """[B, T, V] student log-probabilities at the scored positions (with grad)."""
    logits_B_L_V = model(input_ids=batch.ids_B_L).logits
    idx = batch.pos_B_T[..., None].expand(-1, -1, logits_B_L_V.shape[-1])
    return torch.log_softmax(logits_B_L_V.gather(1, idx).float(), -1)


def compute_loss(model, batch: Batch, loss: str, *, clip_eps: float = 0.0, beta: float = 0.5,
                 baseline: bool = False, normalise: bool = False) -> LossOutput:
    """loss: sft | rkl (sampled-token reverse KL as a PG advantage) | fkl, jsd (teacher top-k + tail)
    | fkl-full, rkl-full, jsd-full (whole-vocabulary divergences, GKD; top_k up to V)."""
    lp_B_T_V = student_logprobs(model, batch)
    lp_B_T = lp_B_T_V.gather(-1, batch.targets_B_T[..., None])[..., 0]
    if loss == "sft":
        return sft_loss(lp_B_T, batch.mask_B_T)
    if loss == "rkl":
        return reverse_kl_pg_loss(lp_B_T, batch.behaviour_B_T, batch.teacher_B_T, batch.mask_B_T, clip_eps=clip_eps,
                                  baseline=baseline, normalise=normalise)
    if batch.top_ids_B_T_K is None:
        raise ValueError(f"the {loss} loss needs the teacher's top-k: sample rollouts with top_k > 0")
    if loss.endswith("-full"):
        teacher_B_T_V = dense_teacher_logprobs(batch.top_ids_B_T_K, batch.top_lp_B_T_K, lp_B_T_V.shape[-1])
        return full_divergence_loss(lp_B_T_V, teacher_B_T_V, batch.mask_B_T, kind=loss[:-5], beta=beta)
    out = (forward_kl_topk_loss(lp_B_T_V, batch.top_ids_B_T_K, batch.top_lp_B_T_K, batch.mask_B_T) if loss == "fkl"
           else jsd_topk_loss(lp_B_T_V, batch.top_ids_B_T_K, batch.top_lp_B_T_K, batch.mask_B_T, beta=beta))
    with torch.no_grad():   # the sampled-token reverse KL estimate, comparable across losses
        out.metrics["reverse_kl"] = float(((batch.behaviour_B_T - batch.teacher_B_T) * batch.mask_B_T).sum()
                                          / batch.mask_B_T.sum().clamp_min(1))
    return out


__all__ = ["Batch", "scored_batch", "sequence_batch", "compute_loss", "student_logprobs", "token_logprobs"]
