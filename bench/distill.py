"""Distillation bench (issues 6 and 13): D1, D2, D3 on both tasks, every role its own process.

Protocol (docs/distillation.md): from one shared SFT checkpoint per task, continue SFT on
teacher samples vs switch to OPD; every method gets the same budget (optimizer steps of the
same batch, so the same teacher tokens); its learning rate is swept on seed 0, then the best
(highest final metric) is rerun on the other seeds. Evals on >= 1,000 held-out problems.

    D1  OPD's final metric / the teacher's (target >= 0.95)
    D2  to 90% of the teacher, SFT / OPD: teacher-seconds with the teacher's sampling counted
        (target >= 5x), FLOPs with and without it (target > 1x with the SFT data given)
    D3  ablation at the best OPD learning rate (seed 0): baseline, normalisation, PPO clip,
        group size, top-k + tail vs full-distribution losses

Run:  .venv/bin/python bench/distill.py [--tasks walks,addition] [--seeds 3] [--steps N] ...
Teacher-seconds are the teacher's own (opd_teacher_engine_seconds_total, read before and after
each run); prints the figures and the ratios side by side; writes results.json and one PNG per task.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from opd_services.config import Settings
from opd_services.demo import LABELS, DemoPlan, n_params, ratio_lines, run_method, summarise, teacher_metric
from opd_services.stack import LocalStack, exit_on_sigterm
from opd_services.tasks import get_task
from opd_services.tasks.models import task_student, task_teacher
from opd_services.trainer import report

ABLATION = {"rkl+baseline": ["--baseline"], "rkl+baseline+normalise": ["--baseline", "--normalise"],
            "rkl+clip0.2": ["--clip-eps", "0.2"], "rkl g=1": ["--group-size", "1"]}
TOPK_ABLATION = {"fkl k=8": ("fkl", 8), "jsd k=8": ("jsd", 8), "fkl-full": ("fkl-full", 64),
                 "jsd-full": ("jsd-full", 64)}


def _lrs(text: str) -> dict[str, list[float]]:
    """'sft=1e-3,3e-3;rkl=3e-4,1e-3' -> {method: [lr, ...]}"""
    out = {}
    for part in filter(None, text.split(";")):
        m, vals = part.split("=")
        out[m.strip()] = [float(v) for v in vals.split(",")]
    return out


def entropy_per_step(task_name: str, checkpoint: Path, n: int = 1024) -> float | None:
    """Walks only: the model's mean entropy per step (nats) on its own held-out samples, the
    Monte-Carlo mean of -log p(sampled token); a uniform choice among 4 successors is ln 4 =
    1.39. Shows how much of the teacher's diversity a (mode-seeking) student keeps."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from opd_services.modeling.sampling import SampleParams, sample
    from opd_services.tasks.train import eval_operands
    task = get_task(task_name)
    if task.eval_temperature == 0:
        return None
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = sample(model, list(task.prompts(eval_operands(task, n))),
                     SampleParams(task.completion_len, 1.0, task.stop_ids, seed=1234))
    return float(-np.concatenate([s.logprobs_T for s in out]).mean())


def bench_task(task: str, args: argparse.Namespace, settings: Settings) -> dict:
    teacher, student = task_teacher(settings.cache_dir, task=task), task_student(settings.cache_dir, task=task)
    t_metric = teacher_metric(teacher, task, args.eval_size)
    plan = DemoPlan(out=args.out / task, task=task, steps=args.steps[task], batch_size=args.batch_size,
                    group_size=args.group_size, eval_every=args.eval_every, eval_size=args.eval_size,
                    train_timeout_s=args.timeout).check()
    lrs = args.lrs[task]
    print(f"\n== {task}: teacher {t_metric:.1%}; {plan.steps} steps x {plan.batch_size}; lrs {lrs}", flush=True)
    sweep: dict[str, dict[float, dict]] = {}
    runs: dict[str, list[dict]] = {}
    ablation: dict[str, dict] = {}
    with (nullcontext() if args.report_only else LocalStack(teacher, plan.out / "logs", max_top_k=64)) as stack:
        def one(method: str, seed: int, lr: float, extra: list[str], loss: str | None = None) -> dict:
            name = re.sub(r"[^a-z0-9.-]+", "-", f"{method}-lr{lr:g}-s{seed}")
            done = (plan.out / name / "engine_seconds.json").exists()
            if args.report_only and not done:
                raise SystemExit(f"--report-only: no finished run {plan.out / name}")
            if done and (args.report_only or args.resume):   # a run a previous bench left in --out
                hist = report.load_history(plan.out / name)
                eng = json.loads((plan.out / name / "engine_seconds.json").read_text())
            else:
                hist, eng = run_method(stack, plan, loss or method, seed, student, lr, extra, console=False, name=name)
            r = report.run_summary(hist, t_metric, eng)
            print(f"  {task:<9}{method:<24}lr {lr:<7g}seed {seed}  final {r['final_accuracy']:6.1%}  "
                  f"tokens {r['teacher_tokens']:>9,}  teacher-s {sum(eng.values()):7.2f}  "
                  f"to 90%: {r['reach_90'] and r['reach_90']['teacher_tokens']}", flush=True)
            return r
        # 1) lr sweep on seed 0  2) the best lr on the other seeds
        for method, values in lrs.items():
            sweep[method] = {lr: one(method, 0, lr, []) for lr in values}
            best = max(values, key=lambda lr: (sweep[method][lr]["final_accuracy"],
                                               -(sweep[method][lr]["reach_90"] or {"teacher_tokens": 1e18})["teacher_tokens"]))
            runs[method] = [sweep[method][best]] + [one(method, s, best, []) for s in range(1, args.seeds)]
            runs[method][0]["lr"] = best
        # 3) ablation at the best reverse-KL lr, seed 0
        if "rkl" in runs:
            lr = runs["rkl"][0]["lr"]
            for name in args.ablation:
                if name in ABLATION:
                    ablation[name] = one(name, 0, lr, ABLATION[name], loss="rkl")
                else:
                    loss, k = TOPK_ABLATION[name]
                    ablation[name] = one(name, 0, lr, ["--top-k", str(k)], loss=loss)
    methods = summarise(runs, n_params(student), n_params(teacher))
    lines, ratios = ratio_lines(methods)
    labelled = {f"{LABELS[m]} (lr {runs[m][0]['lr']:g})": s for m, s in methods.items()}
    metric = get_task(task).metric_name
    report.plot(plan.out / "learning_curve.png", t_metric, labelled,
                f"{task}: OPD vs continued SFT from one SFT checkpoint ({args.seeds} seeds, band = min-max)", metric)
    print(report.table(metric, t_metric, next(iter(runs.values()))[0]["start_accuracy"], labelled))
    print("\n".join(lines))
    entropy = {"teacher": entropy_per_step(task, teacher), "student before": entropy_per_step(task, student)}
    for m, rs in runs.items():   # seed 0's final checkpoint of each method
        lr = rs[0]["lr"]
        entropy[m] = entropy_per_step(task, plan.out / re.sub(r"[^a-z0-9.-]+", "-", f"{m}-lr{lr:g}-s0") / "checkpoint")
    if entropy["teacher"] is not None:
        print("entropy per step, nats, on 1,024 held-out samples (seed 0; ln 4 = 1.39): " +
              ", ".join(f"{k} {v:.2f}" for k, v in entropy.items()))
    iso = {}
    if "sft" in methods:   # the teacher-seconds each method needs to match continued SFT's final mean
        iso = {"target": methods["sft"]["final_mean"], "cost": report.iso_quality(methods, methods["sft"]["final_mean"])}
    return {"teacher_metric": t_metric, "metric": metric, "steps": plan.steps, "methods": methods,
            "ratios": ratios, "iso_quality": iso, "entropy_per_step": entropy, "ablation": ablation,
            "sweep": {m: {str(lr): r for lr, r in v.items()} for m, v in sweep.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="walks,addition")
    p.add_argument("--walks-steps", type=int, default=150)
    p.add_argument("--addition-steps", type=int, default=100)
    p.add_argument("--walks-lrs", default="sft=1e-3,3e-3,1e-2;rkl=1e-3,3e-3,1e-2;rkl-full=1e-3,3e-3,1e-2;"
                                          "jsd-full=1e-3,3e-3,1e-2")
    p.add_argument("--addition-lrs", default="sft=1e-3,3e-3;rkl=1e-3,3e-3;jsd-full=1e-3,3e-3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=1024)
    p.add_argument("--ablation", default=",".join([*ABLATION, *TOPK_ABLATION]),
                   help="comma-separated ablation runs (names of ABLATION / TOPK_ABLATION), or ''")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--resume", action="store_true", help="reuse the finished runs already in --out")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the finished runs already in --out (same flags as the run)")
    p.add_argument("--out", type=Path, default=Path("bench-out/distill"))
    args = p.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.ablation = [a.strip() for a in args.ablation.split(",") if a.strip()]
    unknown = [a for a in args.ablation if a not in ABLATION and a not in TOPK_ABLATION]
    if unknown:
        p.error(f"--ablation: unknown run(s) {unknown}; known: {[*ABLATION, *TOPK_ABLATION]}")
    args.steps = {"walks": args.walks_steps, "addition": args.addition_steps}
    args.lrs = {"walks": _lrs(args.walks_lrs), "addition": _lrs(args.addition_lrs)}
    exit_on_sigterm()
    settings = Settings.load()
    t0 = time.perf_counter()
    results = {}
    for task in tasks:
        results[task] = bench_task(task, args, settings)
        results["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))   # after every task
    _print(results, tasks)
    return 0


def _print(results: dict, tasks: list[str]) -> None:
    for task in tasks:
        res = results[task]
        t = res["teacher_metric"]
        print(f"\n{task}: teacher {res['metric']} {t:.1%}")
        for m, s in res["methods"].items():
            if m != "sft":
                print(f"D1  {LABELS[m]}: {s['final_mean']:.1%} ± {s['final_std']:.1%} = "
                      f"{s['final_mean'] / t:.2f} x teacher (target >= 0.95)")
        for m, r in res["ratios"].items():
            if "note" not in r:
                ge = ">=" if r["lower_bound"] else "="
                print(f"D2  SFT / {LABELS[m]}: teacher-s {ge} {r['teacher_s_sampled']:.1f}x (target >= 5), "
                      f"FLOPs data given {ge} {r['flops_data_given']:.1f}x (target > 1)")
        iso = res.get("iso_quality") or {}
        if iso:
            print("\n".join("    " + line for line in report.iso_lines(iso["target"], iso["cost"], LABELS)))
        print("D3  ablation (seed 0, best rkl lr):")
        for name, r in res["ablation"].items():
            print(f"    {name:<26} final {r['final_accuracy']:6.1%}  to 90%: "
                  f"{r['reach_90'] and r['reach_90']['teacher_tokens']}")


if __name__ == "__main__":
    sys.exit(main())
