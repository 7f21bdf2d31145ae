"""`opd demo` / `make demo`: on-policy distillation end to end, on one machine, in minutes.

  1) the task's teacher and student checkpoints (trained by our code; cached after the first run)
  2) embedded Valkey, the teacher service (`opd serve`) and a scorer (`opd scorer`), each a process
  3) OPD: `opd train` samples with the student, rollouts go through the queue, the scorer has the
     teacher score them, the trainer steps on the reverse KL (its own process)
  4) the baseline: `opd train --mode sft` on teacher samples (POST /v1/generate), with the same
     number of teacher tokens as OPD used
  5) the table (teacher, student before, after OPD, after SFT; teacher tokens and wall time to
     50% / 90% of the teacher), a learning-curve PNG and a JSON summary; everything stopped.
This module holds no training logic: it wires the processes and reports.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from opd_services.config import Settings


@dataclass(frozen=True)
class DemoPlan:
    out: Path = Path("demo-out")
    opd_steps: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    eval_every: int = 10
    eval_size: int = 256
    losses: tuple[str, ...] = ("rkl", "fkl")   # sampled-token reverse KL; teacher top-k forward KL
    top_k: int = 8
    train_timeout_s: float = 300.0
    rebuild: bool = False            # train the checkpoints here instead of using the committed ones


LABELS = {"rkl": "reverse KL", "fkl": "top-{k} fwd KL", "jsd": "top-{k} JSD"}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def teacher_accuracy(model_dir: Path, eval_size: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from opd_services.tasks.addition import DEFAULT_TASK
    from opd_services.tasks.train import eval_operands, exact_match
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return exact_match(model, DEFAULT_TASK, eval_operands(DEFAULT_TASK, eval_size))


def _train_args(plan: DemoPlan, student: Path, out: Path) -> list[str]:
    return ["--student", str(student), "--out", str(out), "--batch-size", str(plan.batch_size), "--lr", str(plan.lr),
            "--eval-every", str(plan.eval_every), "--eval-size", str(plan.eval_size), "--experiment", out.name]


def run_demo(settings: Settings, plan: DemoPlan = DemoPlan()) -> int:
    from opd_services.stack import LocalStack, exit_on_sigterm
    from opd_services.tasks.models import task_student, task_teacher
    from opd_services.trainer import report

    exit_on_sigterm()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    # 1) checkpoints
    _say("[1/5] demo checkpoints (trained by our code; committed builds unless --rebuild-checkpoints)")
    teacher_dir = task_teacher(settings.cache_dir, rebuild=plan.rebuild)
    student_dir = task_student(settings.cache_dir, rebuild=plan.rebuild)
    teacher_acc = teacher_accuracy(teacher_dir, plan.eval_size)
    _say(f"      teacher {teacher_dir.name}: exact match {teacher_acc:.1%}")
    # 2) services
    _say("[2/5] starting embedded Valkey, the teacher (opd serve) and a scorer (opd scorer)")
    with LocalStack(teacher_dir, plan.out / "logs", max_top_k=max(plan.top_k, 20)) as stack:
        _say(f"      teacher {stack.teacher_grpc}  redis {stack.redis_url}")
        # 3) OPD through the queue, one run per loss
        opd = {}
        for loss in plan.losses:
            _say(f"[3/5] OPD ({LABELS[loss].format(k=plan.top_k)}): {plan.opd_steps} steps of {plan.batch_size} "
                 "student rollouts through the queue")
            stack.train(f"opd-{loss}", ["--loss", loss, "--top-k", str(plan.top_k), "--steps", str(plan.opd_steps),
                                        *_train_args(plan, student_dir, plan.out / f"opd-{loss}")], plan.train_timeout_s,
                        console=True)
            opd[loss] = report.load_history(plan.out / f"opd-{loss}")
        budget = max(h["evals"][-1]["teacher_tokens"] for h in opd.values())
        # 4) SFT baseline with the same teacher-token budget
        _say(f"[4/5] SFT on teacher samples, same budget: {budget:,} teacher tokens")
        stack.train("sft", ["--mode", "sft", "--teacher-tokens", str(budget), "--steps", str(10 * plan.opd_steps),
                            *_train_args(plan, student_dir, plan.out / "sft")], plan.train_timeout_s, console=True)
        sft = report.load_history(plan.out / "sft")
    _say("[5/5] services stopped; writing the report")
    return _report(plan, teacher_acc, opd, sft, time.perf_counter() - t_start)


def _report(plan: DemoPlan, teacher_acc: float, opd: dict, sft: dict, total_s: float) -> int:
    from opd_services.trainer import report

    runs = {f"after OPD, {LABELS[loss].format(k=plan.top_k)}": report.run_summary(h, teacher_acc)
            for loss, h in opd.items()}
    runs["after SFT on teacher samples"] = report.run_summary(sft, teacher_acc)
    student_acc = next(iter(opd.values()))["evals"][0]["accuracy"]
    text = report.table(teacher_acc, student_acc, runs)
    png = report.plot(plan.out / "learning_curve.png", teacher_acc, runs,
                      "OPD vs SFT on teacher samples, same teacher-token budget")
    summary = {"teacher_accuracy": teacher_acc, "student_accuracy_before": student_acc, "runs": runs,
               "plan": {k: str(v) for k, v in plan.__dict__.items()}, "total_wall_s": round(total_s, 1)}
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(text)
    print(f"\n(wall times count from each trainer's start; the whole demo took {total_s:.0f}s)")
    print(f"plot: {png}\nsummary: {plan.out / 'summary.json'}")
    return 0
