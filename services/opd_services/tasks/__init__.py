"""Synthetic tasks and the builders of the checkpoints our own code makes (no hub downloads).

`TASKS` names every task the trainer, the demo and the benches accept (`--task NAME`):
addition (long addition with carries: the regime where OPD does not pay) and walks (long
random walks on a random graph: the regime where it should). This module only names them.
"""
from __future__ import annotations

from opd_services.tasks.addition import DEFAULT_TASK
from opd_services.tasks.walks import DEFAULT_WALKS

TASKS = {"addition": DEFAULT_TASK, "walks": DEFAULT_WALKS}


def get_task(name: str):
    """The task called `name`; ValueError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
