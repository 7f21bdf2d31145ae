"""The trainer's pieces in one process: rollout tensors line up with what was sampled, and a
short direct-mode run exports its metrics, history and checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from opd_client.types import ScoredRollout
from opd_services.tasks.addition import DEFAULT_TASK
from opd_services.trainer.batch import scored_batch, student_logprobs
from opd_services.trainer.config import TrainConfig
from opd_services.trainer.sources import sample_rollouts


def test_batch_positions_line_up_with_the_sampled_tokens(random_student):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(random_student, dtype=torch.float32).eval()
    ops = DEFAULT_TASK.sample_operands(np.random.default_rng(3), 12)
    rolls = sample_rollouts(model, DEFAULT_TASK, ops, version=0, temperature=1.0, top_k=0, seed=9, run="t")
    assert len({len(r.token_ids) for r in rolls}) > 1, "want ragged completions to exercise the padding"
    scored = [ScoredRollout(r, r.behaviour_logprobs) for r in rolls]
    batch = scored_batch(scored)
    with torch.no_grad():
        lp_B_T = student_logprobs(model, batch).gather(-1, batch.targets_B_T[..., None])[..., 0]
    mask = batch.mask_B_T.bool()
    # recomputed logprobs of the sampled tokens == the behaviour logprobs recorded when sampling
    np.testing.assert_allclose(lp_B_T[mask].numpy(), batch.behaviour_B_T[mask].numpy(), atol=1e-4)
    assert int(mask.sum()) == sum(r.n_scored for r in rolls)


def test_direct_run_exports_metrics_history_and_checkpoint(teacher, random_student, tmp_path):
    from opd_services.trainer.loop import Trainer
    cfg = TrainConfig(student=random_student, out=tmp_path, teacher_url=teacher.grpc_url, direct=True,
                      experiment="unit", steps=3, batch_size=8, eval_every=2, eval_size=8, metrics_port=0,
                      progress=False)
    hist = Trainer(cfg).run()
    assert [e["step"] for e in hist.evals] == [0, 2, 3]
    sample = lambda name: REGISTRY.get_sample_value(name, {"experiment": "unit"})
    assert sample("opd_trainer_step") == 3
    assert sample("opd_trainer_teacher_tokens_total") == hist.steps[-1]["teacher_tokens"] > 0
    assert sample("opd_trainer_reverse_kl") == pytest.approx(hist.steps[-1]["reverse_kl"])
    assert sample("opd_trainer_eval_accuracy") == hist.evals[-1]["accuracy"]
    assert (tmp_path / "checkpoint" / "model.safetensors").exists() and (tmp_path / "history.json").exists()
