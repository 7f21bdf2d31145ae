"""The trainer's pieces in one process: rollout tensors line up with what was sampled, and a
short direct-mode run exports its metrics, history and checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from opd_client.types import ScoredRollout
from opd_services.errors import ConfigError
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


def test_full_distribution_loss_reaches_the_student_through_compute_loss(random_student):
    """compute_loss('rkl-full') on a scored batch = full_divergence_loss on the dense teacher."""
    from transformers import AutoModelForCausalLM

    from opd_client.losses import dense_teacher_logprobs, full_divergence_loss
    from opd_services.tasks.walks import DEFAULT_WALKS
    from opd_services.trainer.batch import compute_loss
    model = AutoModelForCausalLM.from_pretrained(random_student, dtype=torch.float32).eval()
    ops = DEFAULT_WALKS.sample_operands(np.random.default_rng(4), 6)
    rolls = sample_rollouts(model, DEFAULT_WALKS, ops, version=0, temperature=1.0, top_k=64, seed=3, run="t")
    g = torch.Generator().manual_seed(0)
    scored = []
    for r in rolls:      # a made-up teacher: a random full distribution at every scored position
        lp_T_V = torch.log_softmax(torch.randn(r.n_scored, 64, generator=g) * 3, -1)
        top_lp, top_ids = lp_T_V.topk(64, -1)
        scored.append(ScoredRollout(r, lp_T_V.gather(-1, torch.from_numpy(r.token_ids[r.score_from:])[:, None])[:, 0]
                                    .numpy(), top_ids.numpy(), top_lp.numpy()))
    batch = scored_batch(scored)
    for kind in ("rkl", "fkl", "jsd"):
        out = compute_loss(model, batch, f"{kind}-full")
        with torch.no_grad():
            ref = full_divergence_loss(student_logprobs(model, batch),
                                       dense_teacher_logprobs(batch.top_ids_B_T_K, batch.top_lp_B_T_K, 64),
                                       batch.mask_B_T, kind=kind)
        assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-5)
        assert out.loss.requires_grad


def test_group_size_repeats_prompts_and_the_teacher_counts_its_seconds(teacher, random_student, tmp_path):
    """Walks task, 2 prompts x 4 samples per step; the teacher's engine-seconds grow by kind:
    score for OPD, generate for sampling (the SFT data)."""
    from opd_services.trainer.loop import Trainer
    secs = lambda kind: REGISTRY.get_sample_value("opd_teacher_engine_seconds_total",
                                                  {"experiment": "default", "kind": kind}) or 0.0
    score0, gen0 = secs("score"), secs("generate")
    cfg = TrainConfig(student=random_student, out=tmp_path / "opd", task="walks", teacher_url=teacher.grpc_url,
                      direct=True, experiment="unit-walks", steps=2, batch_size=8, group_size=4, eval_every=2,
                      eval_size=8, metrics_port=0, progress=False)
    trainer = Trainer(cfg)
    problems_B_2 = trainer._problems()
    assert problems_B_2.shape == (8, 2) and (problems_B_2.reshape(2, 4, 2) == problems_B_2[::4][:, None]).all()
    trainer.run()
    assert secs("score") > score0 and secs("generate") == gen0
    from opd_client import TeacherClient
    with TeacherClient(teacher.grpc_url) as client:     # the session teacher's vocab is not the student's
        client.generate([[0, 5]] * 4, max_tokens=16, temperature=1.0, seed=1)
    assert secs("generate") > gen0


def test_queue_max_backlog_reaches_the_trainers_producer(random_student, tmp_path, monkeypatch):
    """OPD_QUEUE_MAX_BACKLOG bounds what `opd train` (queue mode) keeps waiting in its experiment's
    stream: over it a push waits for the scorers, then fails with QueueFull (nothing is written)."""
    import argparse
    import time

    from opd_client.errors import QueueFull
    from opd_client.queue import Rollout
    from opd_services.redis_embed import EmbeddedRedis
    from opd_services.trainer import cli
    from opd_services.trainer.sources import QueueScores

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    with EmbeddedRedis() as redis:
        monkeypatch.setenv("OPD_QUEUE_MAX_BACKLOG", "3")
        args = parser.parse_args(["train", "--redis-url", redis.url, "--out", str(tmp_path), "--student", str(random_student)])
        cfg = cli.config_from(args)
        assert cfg.queue_max_backlog == 3
        rollouts = [Rollout(id=f"r{i}", token_ids=np.arange(1, 9), score_from=4, behaviour_logprobs=np.full(4, -1.0),
                            policy_version=1, sampled_at=time.time()) for i in range(4)]
        source = QueueScores(cfg.redis_url, "backlog", consumer="t", timeout_s=0.2, max_backlog=cfg.queue_max_backlog)
        try:
            source.submit(rollouts[:3])
            with pytest.raises(QueueFull, match="max_backlog=3"):
                source.submit(rollouts[3:])
            assert source.producer.backlog() == 3
        finally:
            source.close()
        monkeypatch.setenv("OPD_QUEUE_MAX_BACKLOG", "0")
        with pytest.raises(ConfigError, match="OPD_QUEUE_MAX_BACKLOG='0'"):
            cli.config_from(args)
