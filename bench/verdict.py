"""The verdict a bench script prints beside a figure: its target and PASS or MISS, in one form for
every script (bench/RESULTS.md quotes these lines)."""
from __future__ import annotations

_HOLDS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "==": lambda v, t: v == t}


def verdict(value: float, target: float, op: str = ">=") -> str:
    """'(target >= 0.9)  PASS' when `value op target` holds, else the same with MISS."""
    return f"(target {op} {target})  {'PASS' if _HOLDS[op](value, target) else 'MISS'}"
