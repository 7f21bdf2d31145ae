"""Autoregressive sampling from a transformers causal LM, with the logprob of every sampled token.

Shared by the teacher's torch engine (`POST /v1/generate`) and the reference trainer (student
rollouts, whose behaviour logprobs the OPD loss needs). Prompts of different lengths are
left-padded; a KV cache makes each new token one small forward pass.

Logprobs are those of the distribution actually sampled from: logits / temperature, then
log-softmax. Temperature 0 means greedy, and the logprobs are then the untempered ones.
A sequence stops after a stop id (which is included in its output) or after max_tokens.
This module does not validate input (callers do) and knows nothing of requests or wire formats.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class SampleParams:
    max_tokens: int
    temperature: float = 1.0            # 0 = greedy
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Sampled:
    """One sampled completion; the stop id, when one ended it, is its last token."""

    token_ids_T: np.ndarray        # int64 [T], T <= max_tokens
    logprobs_T: np.ndarray         # float32 [T], of the distribution sampled from
    finish_reason: str             # "stop" | "length"


def _left_pad(prompts: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lmax = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), lmax), dtype=np.int64)
    mask = np.zeros((len(prompts), lmax), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, lmax - len(p):] = p
        mask[i, lmax - len(p):] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


@torch.inference_mode()
def sample(model, prompts: list[np.ndarray], params: SampleParams) -> list[Sampled]:
    """Sample a completion for every prompt (one batch); blocking."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    ids_B_L, mask_B_L = _left_pad(prompts, device)
    b = ids_B_L.shape[0]
    stops = torch.tensor(sorted(set(params.stop_ids)) or [-1], device=device)
    pos_B_L = (mask_B_L.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids_B_L, attention_mask=mask_B_L, position_ids=pos_B_L, use_cache=True)
    cache, next_pos_B = out.past_key_values, pos_B_L[:, -1] + 1
    logits_B_V = out.logits[:, -1].float()
    tokens, logprobs = [], []
    done_B = torch.zeros(b, dtype=torch.bool, device=device)
    length_B = torch.full((b,), params.max_tokens, dtype=torch.long, device=device)
    for t in range(params.max_tokens):
        # 1) pick the next token of every sequence, with its logprob
        tok_B, lp_B = _pick(logits_B_V, params.temperature, gen)
        tokens.append(tok_B)
        logprobs.append(lp_B)
        # 2) finished sequences keep their length; stop when all are done
        hit_B = torch.isin(tok_B, stops) & ~done_B
        length_B = torch.where(hit_B, torch.full_like(length_B, t + 1), length_B)
        done_B |= hit_B
        if bool(done_B.all()) or t + 1 == params.max_tokens:
            break
        # 3) one cached forward pass for the new tokens
        mask_B_L = torch.cat([mask_B_L, torch.ones(b, 1, dtype=mask_B_L.dtype, device=device)], -1)
        out = model(input_ids=tok_B[:, None], attention_mask=mask_B_L, position_ids=next_pos_B[:, None],
                    past_key_values=cache, use_cache=True)
        cache, next_pos_B = out.past_key_values, next_pos_B + 1
        logits_B_V = out.logits[:, -1].float()
    tok_B_T = torch.stack(tokens, 1).cpu().numpy()
    lp_B_T = torch.stack(logprobs, 1).cpu().numpy().astype(np.float32)
    n_B = length_B.clamp_max(tok_B_T.shape[1]).cpu().numpy()
    return [Sampled(tok_B_T[i, : n_B[i]].copy(), lp_B_T[i, : n_B[i]].copy(),
                    "stop" if done_B[i] else "length") for i in range(b)]


def _pick(logits_B_V: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature == 0:
        lp_B_V = torch.log_softmax(logits_B_V, -1)
        tok_B = lp_B_V.argmax(-1)
    else:
        lp_B_V = torch.log_softmax(logits_B_V / temperature, -1)
        tok_B = torch.multinomial(lp_B_V.exp(), 1, generator=gen)[:, 0]
    return tok_B, lp_B_V.gather(-1, tok_B[:, None])[:, 0]
