"""`opd train`: flags -> TrainConfig, metrics server, signals, run, summary line.

SIGTERM / SIGINT: finish the current step, evaluate, checkpoint, exit 0 (a second signal
exits at once; unacked scored entries are reclaimed by the next trainer).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from opd_services.errors import ConfigError

if TYPE_CHECKING:
    from opd_services.config import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="the reference OPD trainer: student rollouts -> teacher scores -> steps")
    p.add_argument("--student", help="student model dir (default: the demo student, built on first use)")
    p.add_argument("--out", required=True, help="output dir: history.json and checkpoint/")
    p.add_argument("--teacher-url", help="OPD_TEACHER_URL (grpc://HOST:PORT or http://HOST:PORT)")
    p.add_argument("--redis-url", help="OPD_REDIS_URL: the Redis your `opd scorer` reads (queue mode)")
    p.add_argument("--direct", action="store_true", help="score with the teacher directly, without the queue")
    p.add_argument("--experiment", default="demo", help="experiment name (queue keys opd:{NAME}:*)")
    p.add_argument("--task", default="addition", help="the task: addition | walks (opd_services.tasks)")
    p.add_argument("--mode", default="opd", help="opd, or sft on teacher samples (baseline)")
    p.add_argument("--loss", default="rkl", help="OPD loss: rkl (sampled-token reverse KL, the published recipe) | "
                   "fkl | jsd (teacher top-k + tail) | rkl-full | fkl-full | jsd-full (whole vocabulary)")
    p.add_argument("--top-k", type=int, default=8, help="teacher top-k for the top-k and -full losses (up to V)")
    p.add_argument("--beta", type=float, default=0.5, help="JSD beta")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--teacher-tokens", type=int, default=0, help="stop after this many teacher tokens (0 = no limit)")
    p.add_argument("--batch-size", type=int, default=64, help="rollouts (or teacher samples) per step")
    p.add_argument("--group-size", type=int, default=1, help="samples per prompt (divides --batch-size)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--baseline", action="store_true", help="rkl: subtract the batch-mean advantage (off, as published)")
    p.add_argument("--normalise", action="store_true", help="rkl: divide advantages by their std (off, as published)")
    p.add_argument("--clip-eps", type=float, default=0.0, help="rkl: PPO clip of the ratio (0 = plain IS, published)")
    p.add_argument("--prefetch", type=int, default=1, help="queue mode: batches sampled ahead of the step")
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-port", type=int, help="OPD_TRAINER_METRICS_PORT (0 = none)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def settings_from(args: argparse.Namespace) -> "Settings":
    """OPD_* settings with this command's flags on top. Raises ConfigError on a bad value."""
    from opd_services.config import Settings
    return Settings.load(teacher_url=args.teacher_url, redis_url=args.redis_url, trainer_metrics_port=args.metrics_port)


def config_from(args: argparse.Namespace, settings: "Settings | None" = None):
    from opd_services.config import check_tls
    from opd_services.trainer.config import TrainConfig
    if settings is None:
        settings = settings_from(args)
    check_tls(settings)
    if not args.direct and args.mode == "opd" and not settings.redis_url:
        raise ConfigError("queue mode needs --redis-url / OPD_REDIS_URL (the Redis your `opd scorer` reads); "
                          "or pass --direct to call the teacher without the queue")
    from opd_services.tasks import TASKS
    if args.task not in TASKS:     # before building a default student for it
        raise ConfigError(f"--task={args.task!r}: must be one of {tuple(TASKS)}")
    student = args.student
    if student is None:
        from opd_services.tasks.models import task_student
        student = task_student(settings.cache_dir, task=args.task)
    return TrainConfig(
        student=Path(student), out=Path(args.out), task=args.task, teacher_url=settings.teacher_url,
        redis_url=settings.redis_url, queue_max_backlog=settings.queue_max_backlog, teacher_tls=settings.client_tls(),
        direct=args.direct, experiment=args.experiment, mode=args.mode, loss=args.loss, top_k=args.top_k,
        beta=args.beta, steps=args.steps, teacher_tokens=args.teacher_tokens, batch_size=args.batch_size,
        group_size=args.group_size, lr=args.lr, clip_eps=args.clip_eps, temperature=args.temperature,
        baseline=args.baseline, normalise=args.normalise, prefetch=args.prefetch, max_staleness=args.max_staleness,
        eval_every=args.eval_every, eval_size=args.eval_size, checkpoint_every=args.checkpoint_every, seed=args.seed,
        metrics_port=settings.trainer_metrics_port, progress=not args.no_progress)


def cmd_train(args: argparse.Namespace) -> int:
    settings = settings_from(args)             # a bad OPD_* value fails before the heavy imports
    import torch
    from prometheus_client import start_http_server

    from opd_services.trainer.loop import Trainer
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()          # weight loading / shard writing bars: noise here
    cfg = config_from(args, settings)
    torch.set_num_threads(max(1, args.threads))
    if cfg.metrics_port:
        start_http_server(cfg.metrics_port, addr="127.0.0.1")
    trainer = Trainer(cfg)

    def on_signal(sig, frame):
        if trainer.stop_requested:
            os._exit(1)
        trainer.stop_requested = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    hist = trainer.run()
    last = hist.evals[-1]
    print(json.dumps({"step": last["step"], "accuracy": last["accuracy"], "teacher_tokens": last["teacher_tokens"],
                      "wall_s": last["wall_s"], "out": str(cfg.out)}), flush=True)
    return 0
