"""Fixtures of the trainer tests: a small, confident random teacher and a smaller random
student on the demo task's vocabulary (built in seconds; no training)."""
from __future__ import annotations

import pytest

from opd_services.tasks.addition import VOCAB_SIZE
from opd_services.modeling.checkpoints import LlamaShape, build_random_llama


@pytest.fixture(scope="session")
def peaked_teacher(cache_dir):
    """A random Llama whose LM head is scaled up, so its next-token distributions are peaked:
    a student has a clear target (a near-uniform random teacher would give a KL of ~0.01)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = cache_dir / "trainer-peaked-teacher"
    if not (path / "config.json").exists():
        base = build_random_llama(cache_dir / "trainer-teacher-base", LlamaShape(VOCAB_SIZE, 32, 2, 2, 2, 64, 64), seed=5)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(25.0)
        model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def random_student(cache_dir):
    return build_random_llama(cache_dir / "trainer-student", LlamaShape(VOCAB_SIZE, 16, 1, 1, 1, 32, 64), seed=6)
