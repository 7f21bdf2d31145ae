"""The trainer refuses a teacher swapped mid-run: once the scores of a step come (even in part)
from a teacher whose revision differs from the one the run started with, it raises before the
optimizer step, so no update ever mixes two teachers.

Two real teachers on loopback (the tiny model and a copy with one weight changed) sit behind one
client that sends the first N score calls to the first and the rest to the second: what the
trainer sees when the deployment behind its URL is replaced."""
from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from opd_client import TeacherClient
from opd_services.teacher.server import BackgroundTeacher
from opd_services.trainer.config import TrainConfig
from opd_services.trainer.loop import Trainer
from opd_services.trainer.sources import DirectScores

BATCH, PER_REQUEST = 8, 4          # two score calls per step


@pytest.fixture(scope="module")
def other_teacher(settings, tiny_model, tmp_path_factory):
    """The tiny teacher with one weight changed: another revision, same shapes."""
    path = tmp_path_factory.mktemp("swapped") / "tiny-llama"
    shutil.copytree(tiny_model, path)
    weights = load_file(path / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with BackgroundTeacher(settings.model_copy(update={"model": str(path)})) as t:
        yield t


class ReplacedAfter:
    """One score() over two real clients: the first `calls` calls go to `first`, the rest to `then`."""

    def __init__(self, first: TeacherClient, then: TeacherClient, calls: int):
        self.first, self.then, self.calls = first, then, calls

    def score(self, *args, **kw):
        self.calls -= 1
        return (self.first if self.calls >= 0 else self.then).score(*args, **kw)

    def close(self):
        self.first.close()
        self.then.close()


@pytest.mark.parametrize("calls", [2, 3], ids=["between-steps", "mid-batch"])
def test_trainer_refuses_a_teacher_swapped_mid_run(teacher, other_teacher, random_student, tmp_path, calls):
    first, then = TeacherClient(teacher.grpc_url), TeacherClient(other_teacher.grpc_url)
    rev_first, rev_then = first.model().revision, then.model().revision
    assert rev_first != rev_then
    source = DirectScores(teacher.grpc_url, max_per_request=PER_REQUEST)
    source.client.close()
    source.client = ReplacedAfter(first, then, calls)
    cfg = TrainConfig(student=random_student, out=tmp_path, teacher_url=teacher.grpc_url, direct=True,
                      experiment="swap", steps=4, batch_size=BATCH, eval_every=100, eval_size=8, metrics_port=0,
                      progress=False)
    trainer = Trainer(cfg)
    with pytest.raises(RuntimeError, match="teacher changed mid-run") as e:
        trainer.run(source)
    assert rev_first in str(e.value) and rev_then in str(e.value)
    # step 1 used the first teacher only; step 2 (partly or wholly the second) never reached the optimizer
    assert len(trainer.history.steps) == 1 and trainer.history.teacher_revision == rev_first
