"""`opd demo` / `make demo`: on-policy distillation end to end, on one machine, in minutes.

  1) the task's teacher and the shared SFT checkpoint of the student (trained by our code;
     committed builds, cached after the first run)
  2) embedded Valkey, the teacher service (`opd serve`) and a scorer (`opd scorer`), each a process
  3) from that checkpoint, switch to OPD: `opd train` samples with the student, rollouts go
     through the queue, the scorer has the teacher score them, the trainer steps (its own process)
  4) or continue SFT on teacher samples (POST /v1/generate), same steps and teacher tokens
  5) the table (mean ± sd over seeds; teacher tokens, the teacher's own engine-seconds and
     FLOPs to 90% of the teacher), a learning-curve PNG with bands and a JSON summary
This module holds no training logic: it wires the processes and reports. It is a small
version of bench/distill.py's protocol (fewer seeds and steps, no learning-rate sweep).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from opd_services.config import Settings
from opd_services.errors import ConfigError


@dataclass(frozen=True)
class DemoPlan:
    out: Path = Path("demo-out")
    task: str = "walks"
    steps: int = 100                 # optimizer steps per run (every method)
    batch_size: int = 64
    group_size: int = 4              # samples per prompt (the published recipe uses 4)
    losses: tuple[str, ...] = ("rkl", "rkl-full")
    lr_opd: float | None = None      # one lr for every OPD loss; None: LR_BEST per loss
    lr_sft: float = 1e-2             # the best of bench/distill.py's sweep for continued SFT (3e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1)
    top_k: int = 64                  # the -full losses: the whole vocabulary
    eval_every: int = 10
    eval_size: int = 512             # the bench evaluates on 1,024
    train_timeout_s: float = 300.0
    rebuild: bool = False            # train the checkpoints here instead of using the committed ones

    def check(self) -> "DemoPlan":
        """ConfigError naming the flag for a value `opd demo` cannot run."""
        from opd_services.tasks import TASKS
        from opd_services.trainer.config import LOSSES
        bad = [loss for loss in self.losses if loss not in LOSSES]
        checks = [(self.task in TASKS, "task", self.task, f"must be one of {tuple(TASKS)}"),
                  (bool(self.losses) and not bad, "losses", ",".join(self.losses), f"each must be one of {LOSSES}"),
                  (self.lr_opd is None or self.lr_opd > 0, "lr-opd", self.lr_opd, "must be > 0"),
                  (self.lr_sft > 0, "lr-sft", self.lr_sft, "must be > 0"),
                  (self.group_size >= 1, "group-size", self.group_size, "must be >= 1 (samples per prompt)"),
                  (self.batch_size % max(1, self.group_size) == 0, "group-size", self.group_size,
                   f"must divide the batch size {self.batch_size}"),
                  (self.steps >= 1, "steps", self.steps, "must be >= 1"),
                  (len(self.seeds) >= 1, "seeds", self.seeds, "need at least one")]
        for ok, flag, value, reason in checks:
            if not ok:
                raise ConfigError(f"--{flag}={value!r}: {reason}")
        return self


# the best learning rates of bench/distill.py's sweep on the walks task (3e-3 vs 1e-2, seed 0)
LR_BEST = {"sft": 1e-2, "rkl": 3e-3, "rkl-full": 1e-2}
LABELS = {"sft": "continue SFT (teacher samples)", "rkl": "OPD reverse KL (sampled)", "fkl": "OPD top-k fwd KL",
          "jsd": "OPD top-k JSD", "rkl-full": "OPD reverse KL (full dist.)", "fkl-full": "OPD fwd KL (full dist.)",
          "jsd-full": "OPD JSD (full dist.)"}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def teacher_metric(model_dir: Path, task_name: str, eval_size: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from opd_services.tasks import get_task
    from opd_services.tasks.train import eval_operands, held_out_metric
    task = get_task(task_name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return held_out_metric(model, task, eval_operands(task, eval_size))


def n_params(model_dir: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else _prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def run_method(stack, plan: DemoPlan, method: str, seed: int, student: Path, lr: float, extra: list[str],
               console: bool = True, name: str | None = None) -> tuple[dict, dict]:
    """One `opd train` run; returns its history and the teacher's engine-seconds it spent."""
    from opd_services.trainer import report
    name = name or f"{method}-s{seed}"
    out = plan.out / name
    before = stack.engine_seconds()
    mode = ["--mode", "sft"] if method == "sft" else ["--loss", method, "--top-k", str(plan.top_k)]
    stack.train(name, ["--task", plan.task, "--student", str(student), "--out", str(out), "--steps", str(plan.steps),
                       "--batch-size", str(plan.batch_size), "--group-size", str(plan.group_size), "--lr", str(lr),
                       "--seed", str(seed), "--eval-every", str(plan.eval_every), "--eval-size", str(plan.eval_size),
                       "--experiment", name, *mode, *extra], plan.train_timeout_s, console=console)
    after = stack.engine_seconds()
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    (out / "engine_seconds.json").write_text(json.dumps(spent))
    return report.load_history(out), spent


def run_demo(settings: Settings, plan: DemoPlan = DemoPlan()) -> int:
    from opd_services.stack import LocalStack, exit_on_sigterm
    from opd_services.tasks.models import task_student, task_teacher
    from opd_services.trainer import report

    plan.check()
    exit_on_sigterm()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    # 1) checkpoints
    _say(f"[1/5] {plan.task} checkpoints (trained by our code; committed builds unless --rebuild-checkpoints)")
    teacher_dir = task_teacher(settings.cache_dir, task=plan.task, rebuild=plan.rebuild)
    student_dir = task_student(settings.cache_dir, task=plan.task, rebuild=plan.rebuild)
    t_metric = teacher_metric(teacher_dir, plan.task, plan.eval_size)
    _say(f"      teacher {teacher_dir.name}: {t_metric:.1%}")
    # 2) services
    _say("[2/5] starting embedded Valkey, the teacher (opd serve) and a scorer (opd scorer)")
    runs: dict[str, list[dict]] = {}
    with LocalStack(teacher_dir, plan.out / "logs", max_top_k=max(plan.top_k, 20)) as stack:
        _say(f"      teacher {stack.teacher_grpc}  redis {stack.redis_url}")
        methods = [*plan.losses, "sft"]
        for i, method in enumerate(methods):
            # 3) OPD through the queue, one run per loss and seed  4) continue SFT, same steps
            step = "[3/5]" if method != "sft" else "[4/5]"
            lr = plan.lr_sft if method == "sft" else plan.lr_opd or LR_BEST.get(method, 3e-3)
            for seed in plan.seeds:
                _say(f"{step} {LABELS[method]}, seed {seed}: {plan.steps} steps of {plan.batch_size} "
                     f"({plan.batch_size // plan.group_size} prompts x {plan.group_size}), lr {lr:g}")
                hist, engine_s = run_method(stack, plan, method, seed, student_dir, lr, [])
                runs.setdefault(method, []).append(report.run_summary(hist, t_metric, engine_s))
    _say("[5/5] services stopped; writing the report")
    n_s, n_t = n_params(student_dir), n_params(teacher_dir)
    return _report(plan, t_metric, runs, n_s, n_t, time.perf_counter() - t_start)


def summarise(runs: dict[str, list[dict]], n_student: int, n_teacher: int) -> dict[str, dict]:
    from opd_services.trainer import report
    return {m: report.method_summary(rs, report.flops_per_token(m, n_student, n_teacher),
                                     report.flops_per_token(m, n_student, n_teacher, sampled=False))
            for m, rs in runs.items()}


def ratio_lines(methods: dict[str, dict]) -> tuple[list[str], dict]:
    from opd_services.trainer import report
    lines, out = [], {}
    for m, s in methods.items():
        if m == "sft" or "sft" not in methods:
            continue
        r = report.ratios(methods["sft"], s)
        out[m] = r
        if "note" in r:
            lines.append(f"{LABELS[m]}: {r['note']}")
            continue
        ge = ">=" if r["lower_bound"] else "="
        lines.append(f"SFT / {LABELS[m]} to 90% of teacher: teacher-seconds (SFT sampling incl.) {ge} "
                     f"{r['teacher_s_sampled']:.1f}x; FLOPs {ge} {r['flops_sampled']:.1f}x (sampling incl.), "
                     f"{ge} {r['flops_data_given']:.1f}x (SFT data given)")
    return lines, out


def _report(plan: DemoPlan, t_metric: float, runs: dict, n_s: int, n_t: int, total_s: float) -> int:
    from opd_services.tasks import get_task
    from opd_services.trainer import report

    task = get_task(plan.task)
    methods = summarise(runs, n_s, n_t)
    student = float(next(iter(runs.values()))[0]["start_accuracy"])
    labelled = {LABELS[m]: s for m, s in methods.items()}
    text = report.table(task.metric_name, t_metric, student, labelled)
    lines, ratios = ratio_lines(methods)
    iso = {"target": methods["sft"]["final_mean"], "cost": report.iso_quality(methods, methods["sft"]["final_mean"])}
    lines += report.iso_lines(iso["target"], iso["cost"], LABELS)
    png = report.plot(plan.out / "learning_curve.png", t_metric, labelled,
                      f"{plan.task}: from one SFT checkpoint, OPD vs continued SFT ({len(plan.seeds)} seeds, "
                      f"band = min-max)", task.metric_name)
    summary = {"task": plan.task, "metric": task.metric_name, "teacher_metric": t_metric,
               "student_metric_before": student, "params": {"student": n_s, "teacher": n_t},
               "methods": methods, "ratios": ratios, "iso_quality": iso,
               "plan": {k: str(v) for k, v in plan.__dict__.items()}, "total_wall_s": round(total_s, 1)}
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(text)
    print()
    print("\n".join(lines))
    print(f"\n(teacher-seconds: the teacher's own engine time, opd_teacher_engine_seconds_total; the demo took "
          f"{total_s:.0f}s)")
    print(f"plot: {png}\nsummary: {plan.out / 'summary.json'}")
    return 0
