"""Supervised training and held-out evaluation of small Llamas on a synthetic task.

Used to build the tasks' checkpoints (the teacher; the student's short warm start) and by the
reference trainer's evaluation. Works for any task of `opd_services.tasks.TASKS`: batches are
fixed-length (every problem of a task has the same shape), so there is no padding. The metric
decodes at the task's `eval_temperature` (greedy exact match for addition; sampled, with a
fixed seed, valid walks for walks). This module does not talk to the teacher service or the queue.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opd_services.modeling.sampling import SampleParams, sample


@dataclass(frozen=True)
class SFTRecipe:
    steps: int
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 50
    seed: int = 0
    stop_at: float | None = None     # stop once a dev-set exact match reaches this (checked every 50 steps)
    decay: bool = True               # linear decay to 5% over `steps` (off: constant after warm-up)


def lr_lambda(recipe: SFTRecipe):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / recipe.warmup)
        return warm * (max(0.05, 1.0 - step / recipe.steps) if recipe.decay else 1.0)   # linear decay to 5%
    return f


def correct_batch(task, rng: np.random.Generator, n: int) -> torch.Tensor:
    """[n, prompt_len + completion_len] token ids of problems with their correct completions."""
    ops = task.sample_operands(rng, n)
    return torch.from_numpy(np.concatenate([task.prompts(ops), task.completions(ops)], axis=1))


def sft_step(model, opt, seq_B_L: torch.Tensor, prompt_len: int, sched=None) -> float:
    """One cross-entropy step on the completion tokens (prompt masked out)."""
    labels = seq_B_L.clone()
    labels[:, :prompt_len] = -100
    loss = model(input_ids=seq_B_L, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


def sft_train(model, task, recipe: SFTRecipe, progress=None) -> list[float]:
    """Train on correct completions for recipe.steps steps; returns the loss per step."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    dev = eval_operands(task, 256, seed=20_002) if recipe.stop_at is not None else None
    model.train()
    losses = []
    for step in range(recipe.steps):
        losses.append(sft_step(model, opt, correct_batch(task, rng, recipe.batch), task.prompt_len, sched))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if dev is not None and (step + 1) % 50 == 0 and held_out_metric(model, task, dev) >= recipe.stop_at:
            break
    model.eval()
    return losses


def eval_operands(task, n: int = 512, seed: int = 10_001) -> np.ndarray:
    """The held-out set: fixed seed, and the 'eval' parity split (never in training)."""
    return task.sample_operands(np.random.default_rng(seed), n, split="eval")


@torch.no_grad()
def held_out_metric(model, task, operands: np.ndarray, batch: int = 512, seed: int = 1234) -> float:
    """Decode every held-out prompt at the task's eval temperature (seeded) and grade it: the
    share graded correct (exact match for addition, valid walks for walks)."""
    was_training = model.training
    model.eval()
    ok = 0
    prompts = task.prompts(operands)
    for lo in range(0, len(prompts), batch):
        params = SampleParams(max_tokens=task.completion_len, temperature=task.eval_temperature,
                              stop_ids=task.stop_ids, seed=seed + lo)
        out = sample(model, list(prompts[lo:lo + batch]), params)
        ok += int(task.grade(operands[lo:lo + batch], [s.token_ids_T for s in out]).sum())
    model.train(was_training)
    return ok / len(prompts)
