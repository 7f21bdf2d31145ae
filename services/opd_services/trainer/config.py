"""TrainConfig: everything one `opd train` run needs, checked at start-up.

Flags map one to one onto fields (`opd train --help`). A bad value raises ConfigError with the
flag, the value and the reason. This module starts nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from opd_client.tls import TLS
from opd_services.errors import ConfigError
from opd_services.tasks import TASKS

LOSSES = ("rkl", "fkl", "jsd", "rkl-full", "fkl-full", "jsd-full")
MODES = ("opd", "sft")


@dataclass(frozen=True)
class TrainConfig:
    student: Path                      # HF-format student directory (with the task tokenizer)
    out: Path                          # where history.json and checkpoint/ go
    task: str = "addition"             # a name in opd_services.tasks.TASKS
    teacher_url: str = "grpc://127.0.0.1:50051"
    teacher_tls: TLS | None = None     # CA bundle / client certificate for https:// and grpcs:// (OPD_TLS_CA, ...)
    redis_url: str | None = None       # queue mode; None with direct=False: start an embedded Valkey
    queue_max_backlog: int | None = None  # queue mode: a push over this many rollouts waiting + being scored waits (OPD_QUEUE_MAX_BACKLOG)
    direct: bool = False               # call the teacher without the queue
    experiment: str = "demo"
    mode: str = "opd"                  # opd: student samples, teacher scores | sft: teacher samples
    loss: str = "rkl"                  # rkl (sampled-token reverse KL, PG) | fkl | jsd (teacher top-k + tail)
                                       # | rkl-full | fkl-full | jsd-full (whole vocabulary, GKD)
    top_k: int = 8                     # teacher top-k for the top-k and -full losses (-full: up to V)
    beta: float = 0.5                  # JSD weight
    steps: int = 200                   # at most this many optimizer steps
    teacher_tokens: int = 0            # stop once this many teacher tokens were used (0 = no limit)
    batch_size: int = 64               # rollouts (or teacher samples) per step
    group_size: int = 1                # samples per prompt: batch_size / group_size prompts per step
    lr: float = 1e-3
    clip_eps: float = 0.0              # rkl: 0 = plain importance-sampling ratio (published); > 0 PPO clip
    baseline: bool = False             # rkl: subtract the batch-mean advantage (off, as published)
    normalise: bool = False            # rkl: divide advantages by their std (off, as published)
    temperature: float = 1.0           # sampling temperature (student for OPD, teacher for SFT)
    prefetch: int = 1                  # queue mode: batches sampled ahead (1 = one step stale at most)
    max_staleness: int = 4             # rollouts older than this many policy versions are dropped
    eval_every: int = 10
    eval_size: int = 256
    checkpoint_every: int = 0          # 0 = only at the end
    seed: int = 0
    metrics_port: int = 9101           # Prometheus /metrics of this process; 0 = none
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.task in TASKS, "task", f"must be one of {tuple(TASKS)}"),
            (self.mode in MODES, "mode", f"must be one of {MODES}"),
            (self.loss in LOSSES, "loss", f"must be one of {LOSSES}"),
            (self.loss == "rkl" or 1 <= self.top_k, "top_k", "must be >= 1 for the top-k and -full losses"),
            (0 < self.beta < 1, "beta", "must be strictly between 0 and 1"),
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.teacher_tokens >= 0, "teacher_tokens", "must be >= 0"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.group_size >= 1, "group_size", "must be >= 1 (samples per prompt)"),
            (self.batch_size % max(1, self.group_size) == 0, "group_size", "must divide --batch-size"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.clip_eps < 1, "clip_eps", "must be in [0, 1) (0 = no clipping)"),
            (self.temperature > 0, "temperature", "must be > 0 (on-policy samples need a real distribution)"),
            (self.prefetch >= 0, "prefetch", "must be >= 0"),
            (self.max_staleness >= 0, "max_staleness", "must be >= 0"),
            (self.eval_every >= 1 and self.eval_size >= 1, "eval_every", "eval_every and eval_size must be >= 1"),
            ((Path(self.student) / "config.json").is_file(), "student", "no config.json there (an HF-format model dir)"),
            (self.queue_max_backlog is None or self.queue_max_backlog >= 1, "queue_max_backlog", "must be >= 1 (unset = no limit)"),
            (0 <= self.metrics_port <= 65535, "metrics_port", "must be a port, or 0 for none"),
        ]
        for ok, name, reason in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {reason}")

    def to_dict(self) -> dict:
        def plain(v):
            return str(v) if isinstance(v, Path) else {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v
        return {k: plain(v) for k, v in asdict(self).items()}
