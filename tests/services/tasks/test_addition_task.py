"""The demo task (tokenizer, problems, grader) and its two checkpoints: the teacher's accuracy,
the student's size and head start, and the builder that trains them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from opd_services.tasks.addition import DEFAULT_TASK, EOS, TOKENIZER, AdditionTask, CharTokenizer
from opd_services.tasks.models import (STUDENT_SHAPE, TEACHER_SHAPE, build_info, build_trained, n_params,
                                       task_student, task_teacher)
from opd_services.tasks.train import SFTRecipe, eval_operands, held_out_metric


def test_tokenizer_round_trip_and_save(tmp_path):
    text = "12+34=46"
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text
    assert TOKENIZER.vocab_size == 64
    TOKENIZER.save(tmp_path)
    assert CharTokenizer.load(tmp_path) == TOKENIZER
    with pytest.raises(ValueError, match="alphabet"):
        TOKENIZER.encode("é")


def test_completions_are_graded_exactly_and_errors_compound():
    task = AdditionTask(n_digits=12)
    ops = task.sample_operands(np.random.default_rng(0), 200)
    good = task.completions(ops)
    assert good.shape == (200, 25) and task.completion_len >= 24 + 1
    assert task.grade(ops, good).all()
    # one wrong carry: the stated sum is off
    bad = good.copy()
    bad[:, 1] = np.where(bad[:, 1] == TOKENIZER.encode("0")[0], TOKENIZER.encode("1")[0], TOKENIZER.encode("0")[0])
    assert not task.grade(ops, bad).any()
    # malformed: missing <eos>, short, non-digit
    assert not task.grade(ops[:1], [good[0, :-1]]).any()
    assert not task.grade(ops[:1], [np.full(25, EOS)]).any()


def test_sum_read_back_matches_python():
    task = AdditionTask(n_digits=4)
    ops = np.array([[[9, 9, 9, 9], [1, 0, 0, 0]]])       # 9999 + 1, least-significant first
    comp = task.completions(ops)
    assert task.text(comp[0]).startswith("01") and task.grade(ops, comp).all()
    assert task.stated_sum(comp[0]) == 10000


def test_train_and_eval_splits_are_disjoint():
    task = DEFAULT_TASK
    train = task.sample_operands(np.random.default_rng(1), 2000)
    held = eval_operands(task, 512)
    as_set = lambda a: {x.tobytes() for x in a}
    assert not as_set(train) & as_set(held)
    assert (eval_operands(task, 512) == held).all()           # fixed


def test_demo_checkpoints_meet_the_issue_targets(cache_dir):
    teacher, student = task_teacher(cache_dir), task_student(cache_dir)
    assert n_params(STUDENT_SHAPE) <= n_params(TEACHER_SHAPE) / 4
    assert build_info(student)["params"] <= build_info(teacher)["params"] / 4
    import torch
    from transformers import AutoModelForCausalLM
    held = eval_operands(DEFAULT_TASK, 512)
    acc = {}
    for name, path in (("teacher", teacher), ("student", student)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        acc[name] = held_out_metric(model, DEFAULT_TASK, held)
    assert acc["teacher"] >= 0.95, acc
    assert acc["student"] <= 0.6 * acc["teacher"], acc        # starts well below the teacher
    assert (teacher / "tokenizer_opd_chars.json").exists()


def test_builder_trains_and_writes_an_hf_checkpoint(tmp_path):
    from opd_services.modeling.checkpoints import LlamaShape
    path = build_trained(tmp_path / "m", LlamaShape(64, 16, 1, 1, 1, 32, 64), SFTRecipe(steps=3, batch=8), "test build")
    info = json.loads((path / "opd_build.json").read_text())
    assert info["recipe"]["steps"] == 3 and 0.0 <= info["eval_metric"] <= 1.0
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert build_trained(path, LlamaShape(64, 16, 1, 1, 1, 32, 64), SFTRecipe(steps=3), "x") == path   # cached
