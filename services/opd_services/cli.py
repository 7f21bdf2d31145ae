"""The `opd` command: serve, scorer, train, demo, experiments, fleet check."""
from __future__ import annotations

import argparse
import dataclasses
import asyncio
import logging
import sys

from opd_services.errors import ConfigError, OPDError
from opd_services.trainer import cli as train_cli


def _settings(args: argparse.Namespace):
    from opd_services.config import Settings
    keys = ("model", "engine", "host", "http_port", "grpc_port", "device", "dtype", "max_top_k", "redis_url", "auth",
            "teacher_name")
    return Settings.load(**{k: getattr(args, k, None) for k in keys})


def cmd_serve(args: argparse.Namespace) -> int:
    from opd_services.teacher.server import TeacherServer
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.malloc_reuse:          # before any thread: a thread keeps the malloc arena it first used
        from opd_services.memory import reuse_freed_memory
        reuse_freed_memory()
    asyncio.run(TeacherServer(settings).serve_forever())
    return 0


def cmd_scorer(args: argparse.Namespace) -> int:
    from opd_services.config import Settings
    from opd_services.scorer.runner import serve_scorer
    keys = ("teacher_url", "teachers", "redis_url", "scorer_batch_size", "scorer_concurrency", "scorer_metrics_port")
    settings = Settings.load(**{k: getattr(args, k, None) for k in keys})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve_scorer(settings)


def cmd_train(args: argparse.Namespace) -> int:
    return train_cli.cmd_train(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from opd_services.config import Settings
    from opd_services.demo import DemoPlan, run_demo
    plan = DemoPlan(out=Path(args.out), rebuild=args.rebuild_checkpoints)
    given = {"task": args.task, "steps": args.steps, "lr_opd": args.lr_opd, "lr_sft": args.lr_sft,
             "group_size": args.group_size}
    plan = dataclasses.replace(plan, **{k: v for k, v in given.items() if v is not None})
    if args.losses is not None:
        plan = dataclasses.replace(plan, losses=tuple(x.strip() for x in args.losses.split(",") if x.strip()))
    if args.seeds is not None:
        plan = dataclasses.replace(plan, seeds=tuple(range(args.seeds)))
    return run_demo(Settings.load(), plan.check())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opd", description="OPD Teacher: teacher-as-a-service for on-policy distillation.")
    sub = p.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the teacher (HTTP + gRPC) over one engine")
    demo = sub.add_parser("demo", help="from one SFT checkpoint: OPD vs continued SFT, table + plot")
    demo.add_argument("--out", default="demo-out", help="where the table's JSON, the plot and the logs go")
    demo.add_argument("--task", default=None, help="walks (default: where OPD should win) or addition (where it does not)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per run (every method)")
    demo.add_argument("--losses", default=None, help="OPD losses to run, comma-separated (default rkl,rkl-full)")
    demo.add_argument("--lr-opd", type=float, default=None, help="learning rate of the OPD runs")
    demo.add_argument("--lr-sft", type=float, default=None, help="learning rate of the continued-SFT runs")
    demo.add_argument("--group-size", type=int, default=None, help="samples per prompt")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per method")
    demo.add_argument("--rebuild-checkpoints", action="store_true",
                      help="train the teacher and the student's warm start here instead of using the committed builds")
    for sp in (serve,):
        sp.add_argument("--model", help="HF-format model directory (OPD_MODEL)")
        sp.add_argument("--engine", choices=["torch", "vllm", "uniform"], help="OPD_ENGINE")
        sp.add_argument("--host", help="bind address (OPD_HOST)")
        sp.add_argument("--http-port", type=int, help="OPD_HTTP_PORT")
        sp.add_argument("--grpc-port", type=int, help="OPD_GRPC_PORT")
        sp.add_argument("--device", help="OPD_DEVICE: auto, cpu, cuda")
        sp.add_argument("--dtype", help="OPD_DTYPE: auto, float32, bfloat16, float16")
        sp.add_argument("--max-top-k", type=int, help="OPD_MAX_TOP_K")
        sp.add_argument("--redis-url", help="OPD_REDIS_URL: experiments registry (unset = no tenancy)")
        sp.add_argument("--auth", choices=["on", "off", "auto"], help="OPD_AUTH")
        sp.add_argument("--teacher-name", help="OPD_TEACHER_NAME: this teacher's name in a deployment of several")
    scorer = sub.add_parser("scorer", help="score queued rollouts of every experiment through the teacher")
    scorer.add_argument("--teacher-url", help="OPD_TEACHER_URL, e.g. grpc://127.0.0.1:50051 or grpc://h1:50051,h2:50051")
    scorer.add_argument("--teachers", help="OPD_TEACHERS, e.g. 'math=grpc://a:50051,b:50051;code=grpc://c:50051'")
    scorer.add_argument("--redis-url", help="OPD_REDIS_URL (unset = start an embedded Valkey)")
    scorer.add_argument("--batch-size", dest="scorer_batch_size", type=int, help="OPD_SCORER_BATCH_SIZE")
    scorer.add_argument("--concurrency", dest="scorer_concurrency", type=int, help="OPD_SCORER_CONCURRENCY")
    scorer.add_argument("--metrics-port", dest="scorer_metrics_port", type=int, help="OPD_SCORER_METRICS_PORT")
    train_cli.add_parser(sub)
    from opd_services.tenancy.cli import add_parser as add_experiments
    add_experiments(sub)
    from opd_services.scorer.check_cli import add_parser as add_fleet
    add_fleet(sub)
    args = p.parse_args(argv)
    try:
        if hasattr(args, "func"):
            return args.func(args)
        return {"serve": cmd_serve, "scorer": cmd_scorer, "demo": cmd_demo, "train": cmd_train}[args.cmd](args)
    except ConfigError as e:
        print(f"opd: configuration error: {e}", file=sys.stderr)
        return 2
    except OPDError as e:
        print(f"opd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
