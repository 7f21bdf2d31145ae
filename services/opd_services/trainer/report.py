"""Read training histories and report them: crossings of a target accuracy, the demo's table,
the learning-curve plot and the JSON summary. Used by `opd demo` and bench/distill.py.
This module trains nothing and starts nothing.
"""
from __future__ import annotations

import json
from pathlib import Path


def load_history(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "history.json").read_text())


def first_reach(evals: list[dict], target: float) -> dict | None:
    """The first eval point at or above `target` accuracy: its teacher tokens and wall time."""
    for e in evals:
        if e["accuracy"] >= target:
            return {"teacher_tokens": e["teacher_tokens"], "wall_s": e["wall_s"], "step": e["step"]}
    return None


def run_summary(hist: dict, teacher_acc: float) -> dict:
    ev = hist["evals"]
    return {"final_accuracy": ev[-1]["accuracy"], "start_accuracy": ev[0]["accuracy"],
            "teacher_tokens": ev[-1]["teacher_tokens"], "wall_s": ev[-1]["wall_s"], "steps": ev[-1]["step"],
            "reach_50": first_reach(ev, 0.5 * teacher_acc), "reach_90": first_reach(ev, 0.9 * teacher_acc),
            "curve": [(e["teacher_tokens"], e["accuracy"]) for e in ev]}


def _reach(r: dict | None) -> str:
    return "not reached" if r is None else f"{r['teacher_tokens']:>9,} tok {r['wall_s']:>6.1f}s"


def table(teacher_acc: float, student_acc: float, runs: dict[str, dict]) -> str:
    """runs: label -> run_summary. Plain text, one row per model."""
    lines = [f"{'model':<32}{'exact match':>12}   {'to 50% of teacher':>24}   {'to 90% of teacher':>24}",
             "-" * 98,
             f"{'teacher':<32}{teacher_acc:>12.1%}",
             f"{'student before':<32}{student_acc:>12.1%}"]
    for label, r in runs.items():
        lines.append(f"{label:<32}{r['final_accuracy']:>12.1%}   {_reach(r['reach_50']):>24}   {_reach(r['reach_90']):>24}")
    return "\n".join(lines)


def plot(path: Path, teacher_acc: float, runs: dict[str, dict], title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, r in runs.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.axhline(teacher_acc, color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher_acc:.0%})")
    ax.axhline(0.9 * teacher_acc, color="grey", linestyle=":", linewidth=1, label="90% of teacher")
    ax.set_xlabel("teacher tokens used (scored for OPD, generated for SFT)")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
