"""The training loop of `opd train`, spelled out step by step.

    1) keep `prefetch + 1` batches of student rollouts in flight (sampled by the current
       policy; their version is the step that sampled them; group_size samples per prompt)
    2) take one scored batch (queue or direct); drop rollouts staler than max_staleness
       (and any another run of the experiment left behind)
    3) loss (reverse KL as a per-token advantage with an importance ratio, or top-k + tail
       forward KL / JSD, or a full-distribution KL / JSD), optimizer step
    4) ack the scored entries (only now: a crash before this leaves them to be reclaimed)
    5) metrics, progress; every eval_every steps a held-out exact-match eval
The SFT baseline replaces 1-2 with teacher samples (POST /v1/generate).
The run stops at `steps` or once `teacher_tokens` teacher tokens were used, checkpoints
and writes history.json (eval points: step, teacher tokens, wall time, the task's metric).
This module does not start the teacher, the scorer or Redis.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opd_services import metrics
from opd_services.tasks import get_task
from opd_services.tasks.models import TOKENIZERS
from opd_services.tasks.train import eval_operands, held_out_metric
from opd_services.trainer.batch import compute_loss, scored_batch, sequence_batch
from opd_services.trainer.config import TrainConfig
from opd_services.trainer.sources import DirectScores, QueueScores, TeacherSamples, new_run_id, sample_rollouts

log = logging.getLogger(__name__)


@dataclass
class History:
    config: dict
    evals: list[dict] = field(default_factory=list)     # step, teacher_tokens, wall_s, accuracy
    steps: list[dict] = field(default_factory=list)     # step, loss, reverse_kl, teacher_tokens, ...
    teacher_revision: str = ""
    dropped_stale: int = 0
    dropped_foreign: int = 0

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=1))


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from transformers import AutoModelForCausalLM
        self.cfg = cfg
        self.task = get_task(cfg.task)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.eval_ops = eval_operands(self.task, cfg.eval_size)
        self.history = History(config=cfg.to_dict())
        self.step = 0
        self.teacher_tokens = 0
        self.t0 = time.perf_counter()
        self.labels = (cfg.experiment,)
        self.run_id = new_run_id()
        self.stop_requested = False      # set by a signal: finish the step, checkpoint, return
        cfg.out.mkdir(parents=True, exist_ok=True)

    # ---- the loop ----------------------------------------------------------------------

    def run(self, source=None) -> History:
        cfg = self.cfg
        source = source or self._open_source()
        bar = self._bar()
        try:
            self.evaluate()
            in_flight = 0
            while self.step < cfg.steps and not self._budget_spent() and not self.stop_requested:
                if cfg.mode == "sft":
                    out, n_tok = self._sft_step(source)
                else:
                    # 1) rollouts in flight
                    while in_flight < (0 if cfg.direct else cfg.prefetch) + 1:
                        source.submit(self._rollouts())
                        in_flight += 1
                    # 2) one scored batch  3) step  4) ack
                    out, n_tok = self._opd_step(source)
                    in_flight -= 1
                self.step += 1
                self.teacher_tokens += n_tok
                self._record(out, n_tok, bar)
                if self.step % cfg.eval_every == 0 or self.step >= cfg.steps or self._budget_spent():
                    self.evaluate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
        finally:
            source.close()
            if bar is not None:
                bar.close()
        self.checkpoint()
        return self.history

    def _budget_spent(self) -> bool:
        return bool(self.cfg.teacher_tokens) and self.teacher_tokens >= self.cfg.teacher_tokens

    def _problems(self) -> np.ndarray:
        """batch_size problems: batch_size / group_size prompts, each repeated group_size times."""
        cfg = self.cfg
        return np.repeat(self.task.sample_operands(self.rng, cfg.batch_size // cfg.group_size), cfg.group_size, axis=0)

    def _rollouts(self):
        cfg = self.cfg
        ops = self._problems()
        top_k = 0 if cfg.loss == "rkl" else cfg.top_k
        return sample_rollouts(self.model, self.task, ops, version=self.step, temperature=cfg.temperature,
                               top_k=top_k, seed=int(self.rng.integers(2**62)), run=self.run_id)

    def _opd_step(self, source):
        cfg = self.cfg
        scored, acks = [], []
        while not scored:
            # scored entries another run left behind (e.g. its prefetched batch) are acked and skipped
            got = source.collect(cfg.batch_size)
            acks += [eid for eid, _ in got]
            ours = [s for _, s in got if s.rollout.metadata.get("run") == self.run_id]
            self.history.dropped_foreign += len(got) - len(ours)
            scored = [s for s in ours if self.step - s.rollout.policy_version <= cfg.max_staleness]
            self.history.dropped_stale += len(ours) - len(scored)
            if not scored and ours:      # all stale: resample rather than train on them
                source.ack(acks)
                acks = []
                source.submit(self._rollouts())
        for revision in {s.model_revision for s in scored}:     # every rollout: a batch may straddle a swap
            self._check_revision(revision)
        out = self._optimize(scored_batch(scored), cfg.loss)
        source.ack(acks)
        out.metrics["staleness"] = float(np.mean([self.step - s.rollout.policy_version for s in scored]))
        return out, int(sum(s.rollout.n_scored for s in scored))

    def _sft_step(self, source: TeacherSamples):
        ops = self._problems()
        seqs, start, n_tok, revision = source.sample(self.task, ops, self.cfg.temperature,
                                                     seed=int(self.rng.integers(2**62)))
        self._check_revision(revision)
        return self._optimize(sequence_batch(seqs, [start] * len(seqs)), "sft"), n_tok

    def _optimize(self, batch, loss: str):
        out = compute_loss(self.model, batch, loss, clip_eps=self.cfg.clip_eps, beta=self.cfg.beta,
                           baseline=self.cfg.baseline, normalise=self.cfg.normalise)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        out.metrics["loss"] = float(out.loss.detach())
        return out

    def _check_revision(self, revision: str) -> None:
        if not self.history.teacher_revision:
            self.history.teacher_revision = revision
        elif revision and revision != self.history.teacher_revision:
            raise RuntimeError(f"the teacher changed mid-run ({self.history.teacher_revision} -> {revision}); "
                               "refusing to mix two teachers' scores")

    # ---- eval, records, checkpoints -------------------------------------------------------

    def evaluate(self) -> float:
        acc = held_out_metric(self.model, self.task, self.eval_ops)
        self.history.evals.append({"step": self.step, "teacher_tokens": self.teacher_tokens,
                                   "wall_s": round(time.perf_counter() - self.t0, 2), "accuracy": acc})
        metrics.TRAINER_EVAL_ACCURACY.labels(*self.labels).set(acc)
        log.info("step %d: held-out metric %.3f (teacher tokens %d)", self.step, acc, self.teacher_tokens)
        self.history.write(self.cfg.out / "history.json")
        return acc

    def _record(self, out, n_tok: int, bar) -> None:
        m = {"step": self.step, "teacher_tokens": self.teacher_tokens,
             "wall_s": round(time.perf_counter() - self.t0, 2), **out.metrics}
        self.history.steps.append(m)
        metrics.TRAINER_STEP.labels(*self.labels).set(self.step)
        metrics.TRAINER_LOSS.labels(*self.labels).set(m["loss"])
        if "reverse_kl" in m:
            metrics.TRAINER_REVERSE_KL.labels(*self.labels).set(m["reverse_kl"])
        metrics.TRAINER_TEACHER_TOKENS.labels(*self.labels).inc(n_tok)
        if bar is not None:
            bar.update(1)
            post = {"loss": f"{m['loss']:.3f}", "acc": f"{self.history.evals[-1]['accuracy']:.2f}",
                    "tok": self.teacher_tokens}
            if "reverse_kl" in m:
                post["rkl"] = f"{m['reverse_kl']:.3f}"
            bar.set_postfix(post, refresh=False)

    def checkpoint(self) -> Path:
        path = self.cfg.out / "checkpoint"
        self.model.save_pretrained(path, safe_serialization=True)
        TOKENIZERS[self.task.name].save(path)
        self.history.write(self.cfg.out / "history.json")
        return path

    def _bar(self):
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.cfg.steps, desc=f"{self.cfg.mode}:{self.cfg.loss}" if self.cfg.mode == "opd" else "sft",
                    unit="step", file=sys.stderr, dynamic_ncols=True)

    def _open_source(self):
        cfg = self.cfg
        if cfg.mode == "sft":
            return TeacherSamples(cfg.teacher_url, cfg.teacher_tls)
        if cfg.direct:
            return DirectScores(cfg.teacher_url, tls=cfg.teacher_tls)
        return QueueScores(cfg.redis_url, cfg.experiment, consumer=f"trainer-{cfg.experiment}",
                           max_backlog=cfg.queue_max_backlog)
