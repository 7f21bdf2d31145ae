"""Read training histories and report them: crossings of a target metric, teacher cost (the
teacher's own engine-seconds, analytic FLOPs), runs grouped by method over seeds, the table
and the learning-curve plot with bands. Used by `opd demo` and bench/distill.py.
This module trains nothing and starts nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_history(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "history.json").read_text())


def first_reach(evals: list[dict], target: float) -> dict | None:
    """The first eval point at or above `target`: its teacher tokens and wall time."""
    for e in evals:
        if e["accuracy"] >= target:
            return {"teacher_tokens": e["teacher_tokens"], "wall_s": e["wall_s"], "step": e["step"]}
    return None


def flops_per_token(method: str, n_student: int, n_teacher: int, *, sampled: bool = True) -> float:
    """Analytic FLOPs per trained token (2 N forward, 6 N forward + backward).
    OPD: student sampling + student step + teacher scoring. SFT: the student step, plus the
    teacher's decoding when the SFT data is sampled from the teacher (`sampled`)."""
    if method == "sft":
        return 6 * n_student + (2 * n_teacher if sampled else 0)
    return 2 * n_student + 6 * n_student + 2 * n_teacher


def run_summary(hist: dict, teacher_metric: float, engine_s: dict | None = None) -> dict:
    """One run: final metric, crossings of 50% / 90% of the teacher, and its teacher cost.
    engine_s: the teacher's engine seconds this run spent, by kind (score, generate)."""
    ev = hist["evals"]
    tokens = ev[-1]["teacher_tokens"]
    teacher_s = sum((engine_s or {}).values())
    out = {"final_accuracy": ev[-1]["accuracy"], "start_accuracy": ev[0]["accuracy"], "teacher_tokens": tokens,
           "wall_s": ev[-1]["wall_s"], "steps": ev[-1]["step"], "engine_s": engine_s or {},
           "teacher_s_per_token": teacher_s / tokens if tokens else 0.0,
           "reach_50": first_reach(ev, 0.5 * teacher_metric), "reach_90": first_reach(ev, 0.9 * teacher_metric),
           "curve": [(e["teacher_tokens"], e["accuracy"]) for e in ev]}
    if out["reach_90"] is not None:   # the run's measured seconds per token, times the tokens to the target
        out["reach_90"]["teacher_s"] = out["reach_90"]["teacher_tokens"] * out["teacher_s_per_token"]
    return out


def tokens_to(run: dict, target: float) -> int | None:
    """Teacher tokens a run used up to its first eval at or above `target` (None: never)."""
    return next((tok for tok, acc in run["curve"] if acc >= target), None)


def iso_quality(methods: dict[str, dict], target: float) -> dict[str, dict | None]:
    """Per method, the median over seeds of the teacher tokens and teacher-seconds (the run's
    measured seconds per token times those tokens) to reach `target`; None when fewer than
    half of its seeds got there."""
    out = {}
    for m, s in methods.items():
        got = [(t, t * r["teacher_s_per_token"]) for r in s["runs"] if (t := tokens_to(r, target)) is not None]
        ok = got and 2 * len(got) >= len(s["runs"])
        out[m] = {"tokens": float(np.median([t for t, _ in got])),
                  "teacher_s": float(np.median([x for _, x in got]))} if ok else None
    return out


def iso_lines(target: float, cost: dict[str, dict | None], labels: dict[str, str]) -> list[str]:
    """The iso_quality figures as text, each method against continued SFT ("sft")."""
    sft = cost.get("sft")
    lines = [f"to continued SFT's final mean ({target:.1%}), median over seeds (SFT / this):"]
    for m, c in cost.items():
        if c is None:
            lines.append(f"  {labels.get(m, m):<34}not reached")
            continue
        vs = (f"  ({sft['tokens'] / c['tokens']:.1f}x tokens, {sft['teacher_s'] / c['teacher_s']:.1f}x teacher-s)"
              if sft and m != "sft" and c["tokens"] and c["teacher_s"] else "")
        lines.append(f"  {labels.get(m, m):<34}{c['tokens']:>9,.0f} tok {c['teacher_s']:8.2f} s{vs}")
    return lines


def method_summary(runs: list[dict], flops_tok: float, flops_tok_given: float | None = None) -> dict:
    """Runs of one method over seeds: mean and spread of the final metric; the median cost to
    90% of the teacher over the seeds that got there (None when fewer than half did)."""
    finals = np.array([r["final_accuracy"] for r in runs])
    reached = [r["reach_90"] for r in runs if r["reach_90"] is not None]
    half = len(reached) * 2 >= len(runs)
    tok90 = float(np.median([r["teacher_tokens"] for r in reached])) if half and reached else None
    s90 = float(np.median([r["teacher_s"] for r in reached])) if half and reached else None
    return {"seeds": len(runs), "final_mean": float(finals.mean()), "final_std": float(finals.std()),
            "final_min": float(finals.min()), "final_max": float(finals.max()), "reached_90": len(reached),
            "tokens_to_90": tok90, "teacher_s_to_90": s90,
            "flops_to_90": tok90 * flops_tok if tok90 is not None else None,
            "flops_to_90_data_given": tok90 * flops_tok_given if tok90 is not None and flops_tok_given else None,
            "flops_per_token": flops_tok, "flops_given_per_token": flops_tok_given or flops_tok,
            "teacher_tokens": float(np.mean([r["teacher_tokens"] for r in runs])),
            "engine_s": {k: float(np.mean([r["engine_s"].get(k, 0.0) for r in runs])) for k in ("score", "generate")},
            "runs": runs}


def _cost(m: dict) -> str:
    if m["tokens_to_90"] is None:
        return f"{'not reached':>30}"
    return f"{m['tokens_to_90']:>9,.0f} tok {m['teacher_s_to_90']:>7.2f} s {m['flops_to_90']:>8.2e}"


def table(metric_name: str, teacher_metric: float, student_metric: float, methods: dict[str, dict]) -> str:
    """methods: label -> method_summary. Plain text, one row per method."""
    lines = [f"{'model':<34}{metric_name + ' (mean ± sd, seeds)':>30}   {'to 90% of teacher: tokens, teacher-s, FLOPs':>44}",
             "-" * 112,
             f"{'teacher':<34}{teacher_metric:>30.1%}",
             f"{'student before (shared SFT ckpt)':<34}{student_metric:>30.1%}"]
    for label, m in methods.items():
        stat = f"{m['final_mean']:.1%} ± {m['final_std']:.1%} ({m['seeds']})"
        lines.append(f"{label:<34}{stat:>30}   {_cost(m):>44}")
    return "\n".join(lines)


def plot(path: Path, teacher_metric: float, methods: dict[str, dict], title: str, metric_name: str) -> Path:
    """Two panels, metric against teacher tokens and against the teacher's engine-seconds:
    the mean over seeds as a line, min-max over seeds as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for label, m in methods.items():
        n = min(len(r["curve"]) for r in m["runs"])
        ys = np.array([[y for _, y in r["curve"][:n]] for r in m["runs"]])
        toks = np.array([[x for x, _ in r["curve"][:n]] for r in m["runs"]]).mean(0)
        rate = float(np.mean([r["teacher_s_per_token"] for r in m["runs"]]))
        for ax, xs in zip(axes, (toks, toks * rate)):
            line, = ax.plot(xs, ys.mean(0), marker="o", markersize=2, label=label)
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    for ax, xlabel in zip(axes, ("teacher tokens (scored for OPD, generated for SFT)",
                                 "teacher engine-seconds (measured by the teacher)")):
        ax.axhline(teacher_metric, color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher_metric:.0%})")
        ax.axhline(0.9 * teacher_metric, color="grey", linestyle=":", linewidth=1, label="90% of teacher")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {metric_name}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ratios(sft: dict, opd: dict) -> dict:
    """The published ratios, SFT / OPD to 90% of the teacher (> 1 favours OPD): teacher-seconds
    with the teacher's sampling counted, FLOPs with it counted, FLOPs with the SFT data given.
    When SFT never got there a ratio is a lower bound: its whole spend over OPD's cost."""
    out = {}
    if opd["tokens_to_90"] is None:
        return {"note": "OPD did not reach 90% of the teacher"}
    bound = sft["tokens_to_90"] is None
    sft_tok = sft["teacher_tokens"] if bound else sft["tokens_to_90"]
    sft_s = sum(sft["engine_s"].values()) if bound else sft["teacher_s_to_90"]
    out["lower_bound"] = bound
    out["teacher_s_sampled"] = sft_s / opd["teacher_s_to_90"] if opd["teacher_s_to_90"] else None
    out["flops_sampled"] = sft_tok * sft["flops_per_token"] / opd["flops_to_90"]
    out["flops_data_given"] = sft_tok * sft["flops_given_per_token"] / opd["flops_to_90"]
    return out
