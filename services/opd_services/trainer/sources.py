"""Where the trainer's data comes from: student rollouts, and their teacher scores either
through the queue (producer -> scorers -> consumer) or straight from the teacher (`--direct`);
for the SFT baseline, samples from the teacher itself.

Both score sources hand back `(entry_id, ScoredRollout)` pairs and take an `ack` after the
optimizer step, so the training loop does not know which one it has. The trainer reaches the
teacher only through opd_client, exactly as a user's trainer would. No losses here.
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from opd_client import TLS, Sequence, TeacherClient
from opd_client.types import Rollout, ScoredRollout
from opd_services.modeling.sampling import SampleParams, sample


def sample_rollouts(model, task, operands: np.ndarray, *, version: int, temperature: float,
                    top_k: int, seed: int, run: str) -> list[Rollout]:
    """The student's own completions, with the logprob of every sampled token (behaviour policy)."""
    prompts = task.prompts(operands)
    params = SampleParams(max_tokens=task.completion_len, temperature=temperature, stop_ids=task.stop_ids,
                          seed=seed)
    was_training = model.training
    model.eval()
    out = sample(model, list(prompts), params)
    model.train(was_training)
    now = time.time()
    return [Rollout(id=f"{run}-v{version}-{i}", token_ids=np.concatenate([p, s.token_ids_T]),
                    score_from=len(p), behaviour_logprobs=s.logprobs_T, policy_version=version, sampled_at=now,
                    metadata={"run": run}, top_k=top_k) for i, (p, s) in enumerate(zip(prompts, out))]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class DirectScores:
    """Score rollouts with one TeacherClient call per step (no queue)."""

    def __init__(self, teacher_url: str, max_per_request: int = 256, tls: TLS | None = None):
        self.client = TeacherClient(teacher_url, tls=tls)
        self.max_per_request = max_per_request
        self._waiting: list[Rollout] = []

    def submit(self, rollouts: list[Rollout]) -> None:
        self._waiting.extend(rollouts)

    def collect(self, n: int) -> list[tuple[str, ScoredRollout]]:
        take, self._waiting = self._waiting[:n], self._waiting[n:]
        out = []
        for lo in range(0, len(take), self.max_per_request):
            chunk = take[lo:lo + self.max_per_request]
            k = max(r.top_k for r in chunk)
            resp = self.client.score([Sequence(r.token_ids, r.score_from, r.id) for r in chunk], top_k=k)
            now = time.time()
            for r, s in zip(chunk, resp.results):
                out.append((r.id, ScoredRollout(r, s.logprobs_T, s.top_ids_T_K, s.top_logprobs_T_K,
                                                resp.model.revision, now)))
        return out

    def ack(self, entry_ids: list[str]) -> None:
        pass

    def close(self) -> None:
        self.client.close()


class QueueScores:
    """Push rollouts to opd:{exp}:rollouts; read scored ones from opd:{exp}:scored, ack after use."""

    def __init__(self, redis_url: str, experiment: str, consumer: str, *, timeout_s: float = 120.0,
                 max_backlog: int | None = None):
        from opd_client.queue import RolloutProducer, ScoredConsumer
        self.producer = RolloutProducer(redis_url, experiment, max_backlog=max_backlog, block_timeout_s=timeout_s)
        self.consumer = ScoredConsumer(redis_url, experiment, consumer=consumer)
        self.timeout_s = timeout_s

    def submit(self, rollouts: list[Rollout]) -> None:
        self.producer.push(rollouts)

    def collect(self, n: int) -> list[tuple[str, ScoredRollout]]:
        out: list[tuple[str, ScoredRollout]] = []
        deadline = time.monotonic() + self.timeout_s
        while len(out) < n:
            if time.monotonic() > deadline:
                from opd_client.errors import Unavailable
                raise Unavailable(f"only {len(out)} of {n} scored rollouts arrived in {self.timeout_s:.0f}s: is an "
                                  "`opd scorer` running against this Redis and the teacher?")
            out.extend(self.consumer.read(count=n - len(out), block_ms=500))
        return out

    def ack(self, entry_ids: list[str]) -> None:
        self.consumer.ack(entry_ids)

    def close(self) -> None:
        self.producer.close()
        self.consumer.close()


class TeacherSamples:
    """The SFT baseline's data: the teacher's own completions (POST /v1/generate)."""

    def __init__(self, teacher_url: str, tls: TLS | None = None):
        self.client = TeacherClient(teacher_url, tls=tls)

    def sample(self, task, operands: np.ndarray, temperature: float, seed: int):
        """([prompt + completion] sequences, prompt length, teacher tokens generated)."""
        prompts = task.prompts(operands)
        resp = self.client.generate([p.tolist() for p in prompts], max_tokens=task.completion_len,
                                    temperature=temperature, stop_ids=list(task.stop_ids), seed=seed)
        seqs = [np.concatenate([p, r.token_ids_T]) for p, r in zip(prompts, resp.results)]
        return seqs, task.prompt_len, resp.usage.generated_tokens, resp.model.revision

    def close(self) -> None:
        self.client.close()
