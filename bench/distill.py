"""Distillation bench (issue 6): D1, D2, D3 on the demo task, every role its own process.

    D1  the OPD student's exact match vs the teacher's (target: >= 90% of it)
    D2  teacher tokens to reach 90% of the teacher: OPD vs SFT on teacher samples (ratio)
    D3  loss ablation at one teacher-token budget: sampled-token reverse KL vs top-k forward
        KL vs JSD(0.5), k in {1, 8, 32}: final exact match and teacher tokens used

Run:  .venv/bin/python bench/distill.py [--budget TOKENS] [--out DIR] [--skip-ablation]
Teacher tokens: positions the teacher scored (OPD; the top-k losses get k logprobs per
position on top) or tokens it generated (SFT). Prints the figures and the ratios side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# bench/queue.py would shadow the stdlib `queue` (torch imports it): drop this script's folder
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from opd_services.config import Settings
from opd_services.demo import teacher_accuracy
from opd_services.stack import LocalStack, exit_on_sigterm
from opd_services.tasks.models import task_student, task_teacher
from opd_services.trainer import report

ABLATION = [("rkl", 0), ("fkl", 1), ("fkl", 8), ("fkl", 32), ("jsd", 1), ("jsd", 8), ("jsd", 32)]


def train(stack: LocalStack, out: Path, name: str, student: Path, budget: int, args: argparse.Namespace,
          extra: list[str]) -> dict:
    stack.train(name, ["--student", str(student), "--out", str(out / name), "--teacher-tokens", str(budget),
                       "--steps", "100000", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                       "--eval-every", "10", "--eval-size", "256", "--experiment", f"bench-{name}",
                       "--no-progress", *extra], timeout_s=args.timeout)
    return report.load_history(out / name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=240_000, help="teacher tokens per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=Path("bench-out/distill"))
    p.add_argument("--skip-ablation", action="store_true")
    args = p.parse_args()
    exit_on_sigterm()
    settings = Settings.load()
    teacher, student = task_teacher(settings.cache_dir), task_student(settings.cache_dir)
    t_acc = teacher_accuracy(teacher, 256)
    results: dict = {"teacher_accuracy": t_acc, "budget": args.budget, "runs": {}}
    t0 = time.perf_counter()
    with LocalStack(teacher, args.out / "logs", max_top_k=32) as stack:
        runs = [("opd-rkl", ["--loss", "rkl"]), ("sft", ["--mode", "sft"])]
        if not args.skip_ablation:
            runs += [(f"opd-{loss}-k{k}", ["--loss", loss, "--top-k", str(k)]) for loss, k in ABLATION if k]
        for name, extra in runs:
            hist = train(stack, args.out, name, student, args.budget, args, extra)
            results["runs"][name] = report.run_summary(hist, t_acc)
            r = results["runs"][name]
            print(f"{name:<14} final {r['final_accuracy']:6.1%}  teacher tokens {r['teacher_tokens']:>9,}  "
                  f"wall {r['wall_s']:6.1f}s  to 90%: {r['reach_90']}", flush=True)
    results["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    _print(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def _print(res: dict) -> None:
    t_acc, runs = res["teacher_accuracy"], res["runs"]
    opd, sft = runs["opd-rkl"], runs["sft"]
    print(f"\nteacher exact match {t_acc:.1%}; student before {opd['start_accuracy']:.1%}; budget {res['budget']:,} tokens")
    print(f"D1  OPD (rkl) final {opd['final_accuracy']:.1%} = {opd['final_accuracy'] / t_acc:.2f} x teacher "
          f"(target >= 0.90)")
    o90, s90 = opd["reach_90"], sft["reach_90"]
    ratio = (f"{s90['teacher_tokens'] / o90['teacher_tokens']:.2f}x in OPD's favour" if o90 and s90
             else "n/a (one of them did not reach 90% within the budget)")
    print(f"D2  tokens to 90% of teacher: OPD {o90 and o90['teacher_tokens']}, SFT {s90 and s90['teacher_tokens']} "
          f"-> ratio SFT/OPD: {ratio}")
    reached = {n: r["reach_90"]["teacher_tokens"] for n, r in runs.items() if n.startswith("opd") and r["reach_90"]}
    if reached and s90:
        best = min(reached, key=reached.get)
        print(f"    fastest OPD loss to 90%: {best} at {reached[best]:,} tokens -> ratio SFT/OPD "
              f"{s90['teacher_tokens'] / reached[best]:.2f}x (> 1 favours OPD)")
    print("D3  loss ablation (same budget):")
    for name, r in runs.items():
        if name.startswith("opd"):
            print(f"    {name:<14} final {r['final_accuracy']:6.1%}  teacher tokens {r['teacher_tokens']:>9,}  "
                  f"to 90%: {r['reach_90'] and r['reach_90']['teacher_tokens']}")


if __name__ == "__main__":
    sys.exit(main())
