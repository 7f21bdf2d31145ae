"""The walks task (graph, reference walks, grader, edge coverage, splits) and its two
committed checkpoints: a teacher that learnt the graph, a student that starts well below it."""
from __future__ import annotations

import numpy as np
import pytest

from opd_services.tasks import TASKS, get_task
from opd_services.tasks.walks import FIRST_NODE, TOKENIZER, WalkTask
from opd_services.tasks.addition import EOS


def test_graph_has_fixed_out_degree_and_no_self_loops():
    task = WalkTask()
    nb = task.neighbours_N_D
    assert nb.shape == (61, 4) and task.adjacency_N_N.sum() == 61 * 4
    assert not task.adjacency_N_N[np.arange(61), np.arange(61)].any()
    assert (WalkTask().neighbours_N_D == nb).all()                      # fixed by its seed
    assert not (WalkTask(graph_seed=8).neighbours_N_D == nb).all()


def test_reference_walks_are_valid_and_one_bad_step_fails_the_walk():
    task = WalkTask()
    ops = task.sample_operands(np.random.default_rng(0), 300)
    good = task.completions(ops)
    assert good.shape == (300, 64) and task.grade(ops, good).all()
    assert (task.completions(ops) == good).all()                        # fixed by each problem's seed
    bad = good.copy()
    t = 30
    prev = bad[:, t - 1] - FIRST_NODE
    # a step to a node that is not a successor of the one before it
    bad[:, t] = np.array([np.flatnonzero(~task.adjacency_N_N[p])[0] for p in prev]) + FIRST_NODE
    assert not task.grade(ops, bad).any()
    steps = task.step_valid(ops[:1], bad[:1])[0]
    assert not steps[t] and steps[:t].all() and steps[t + 2:].all()      # t (and t + 1 from the wrong node)
    assert not task.grade(ops[:1], [good[0, :-1]]).any()                 # too short
    assert not task.grade(ops[:1], [np.concatenate([good[0, :10], [EOS]])]).any()
    assert TOKENIZER.decode([FIRST_NODE + 5]) == "v5 "


def test_edge_coverage_counts_distinct_valid_edges():
    task = WalkTask()
    ops = np.array([[0, 0]])
    succ = task.neighbours_N_D[0, 0]
    back = [v for v in task.neighbours_N_D[succ] if v == 0]
    comp = np.array([succ + FIRST_NODE] * 64)                            # one edge, then invalid self-steps
    assert task.edge_coverage(ops, [comp]) == pytest.approx(1 / 244)
    many = task.sample_operands(np.random.default_rng(1), 400)
    assert task.edge_coverage(many, task.completions(many)) > 0.95      # uniform walks use nearly every edge
    assert back == [] or back == [0]


def test_train_and_held_out_problems_are_disjoint():
    task = get_task("walks")
    train = task.sample_operands(np.random.default_rng(1), 2000)
    held = task.sample_operands(np.random.default_rng(2), 2000, split="eval")
    assert (train[:, 1] % 2 == 0).all() and (held[:, 1] % 2 == 1).all()
    assert set(TASKS) == {"addition", "walks"}
    with pytest.raises(ValueError, match="known: addition, walks"):
        get_task("sorting")


def test_walks_checkpoints_teacher_learnt_the_graph_student_starts_below(cache_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from opd_services.tasks.models import SPECS, build_info, n_params, task_student, task_teacher
    from opd_services.tasks.train import eval_operands, held_out_metric
    task = get_task("walks")
    teacher, student = task_teacher(cache_dir, task="walks"), task_student(cache_dir, task="walks")
    assert n_params(SPECS["walks", "student"].shape) <= n_params(SPECS["walks", "teacher"].shape) / 4
    held = eval_operands(task, 512)
    got = {}
    for name, path in (("teacher", teacher), ("student", student)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        got[name] = held_out_metric(model, task, held)
        assert build_info(path)["task"]["name"] == "walks"
    assert got["teacher"] >= 0.8 and got["student"] <= got["teacher"] / 2, got
