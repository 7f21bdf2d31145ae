"""The model identity's revision is a hash of what makes the teacher: changing the weights (one
number) or the tokenizer changes it, an identical copy does not. Trainers rely on it to refuse
a silent teacher swap (tests/services/trainer/test_teacher_swap.py)."""
from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from opd_services.teacher.engines.torch_engine import TorchEngine


def revision(path) -> str:
    return TorchEngine(path, device="cpu").info.revision


def test_weights_and_tokenizer_changes_change_the_revision(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    base = revision(tiny_model)
    assert revision(copy) == base                                  # the same files, elsewhere: the same teacher

    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3                              # one weight, slightly
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    changed_weights = revision(copy)
    assert changed_weights != base

    shutil.copy(tiny_model / "model.safetensors", copy / "model.safetensors")
    assert revision(copy) == base                                  # weights restored: the same teacher again
    (copy / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    with_tokenizer = revision(copy)
    (copy / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    changed_tokenizer = revision(copy)
    assert len({base, changed_weights, with_tokenizer, changed_tokenizer}) == 4
    assert torch.equal(load_file(copy / "model.safetensors")[name], load_file(tiny_model / "model.safetensors")[name])
