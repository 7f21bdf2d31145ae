"""Several teachers behind one queue, and the replica agreement check, on real parts: teachers
(torch engine, two different tiny models) on loopback, a real Valkey, the scorer on threads.

- experiments routed to their default teacher (registry), one rollout naming another,
  one naming a teacher nobody serves (dead letter naming the known ones);
- replicas that agree -> max diff ~0, no identity mismatch; a replica in bfloat16 or with
  other weights -> the gauge says which pair, and the identity mismatch is flagged.
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from opd_client.queue import RolloutProducer
from opd_client.queue.connection import connect
from opd_client.types import Rollout, Sequence
from opd_services import metrics
from opd_services.config import Settings
from opd_services.modeling.checkpoints import TINY, build_random_llama
from opd_services.redis_embed import EmbeddedRedis
from opd_services.scorer.agreement import ReplicaCheck
from opd_services.teacher.server import BackgroundTeacher
from opd_services.tenancy.registry import Registry
from queue_helpers import drain_scored, running_scorer


@pytest.fixture(scope="module")
def redis():
    with EmbeddedRedis() as r:
        yield r.url


@pytest.fixture(scope="module")
def other_model(cache_dir):
    return build_random_llama(cache_dir / "tiny-llama-other", TINY, seed=99)


def _teacher(model, name: str, dtype: str = "float32") -> BackgroundTeacher:
    return BackgroundTeacher(Settings(model=str(model), engine="torch", device="cpu", dtype=dtype, host="127.0.0.1",
                                      http_port=0, grpc_port=0, teacher_name=name, drain_timeout_s=1))


@pytest.fixture(scope="module")
def fleet(tiny_model, other_model):
    """math: two replicas of one model; code: another model."""
    with _teacher(tiny_model, "math") as m1, _teacher(tiny_model, "math") as m2, \
            _teacher(other_model, "code") as c1:
        yield {"math": (m1, m2), "code": (c1,)}


def _spec(fleet) -> str:
    return ";".join(f"{name}=grpc://" + ",".join(f"127.0.0.1:{t.server.grpc_port}" for t in reps)
                    for name, reps in fleet.items())


def _rollouts(n: int, prefix: str, teacher: str = "") -> list[Rollout]:
    rng = np.random.default_rng(len(prefix))
    return [Rollout(id=f"{prefix}{i}", token_ids=rng.integers(0, 128, 24), score_from=6, teacher=teacher)
            for i in range(n)]


def test_rollouts_go_to_their_teacher_and_say_who_scored_them(redis, fleet):
    reg = Registry(connect(redis))
    em, ec = f"m{uuid.uuid4().hex[:8]}", f"c{uuid.uuid4().hex[:8]}"
    reg.create(em, teacher="math")
    reg.create(ec, teacher="code")
    revs = {name: reps[0].server.service.model_info().revision for name, reps in fleet.items()}
    assert revs["math"] != revs["code"]
    with RolloutProducer(redis, em) as p:
        p.push(_rollouts(30, "m"))
    with RolloutProducer(redis, ec) as p:
        p.push(_rollouts(30, "c") + _rollouts(1, "named", teacher="math") + _rollouts(1, "lost", teacher="physics"))
    with running_scorer(redis, "grpc://unused:1", teachers=_spec(fleet), replica_check_rate=0.0):
        got_m = drain_scored(redis, em, 30)
        got_c = drain_scored(redis, ec, 31)
    assert len(got_m) == 30 and len(got_c) == 31
    for s in got_m:
        assert (s.teacher, s.model_revision) == ("math", revs["math"])
    for s in got_c:
        want = "math" if s.rollout.id.startswith("named") else "code"
        assert (s.teacher, s.model_revision) == (want, revs[want]), s.rollout.id
    dead = connect(redis).xrange(f"opd:{{{ec}}}:dead")
    assert len(dead) == 1
    reason = dead[0][1][b"reason"].decode()
    assert "'physics'" in reason and "code, math" in reason


def test_experiment_default_teacher_must_be_a_name(redis):
    with pytest.raises(ValueError, match="teacher"):
        Registry(connect(redis)).create(f"x{uuid.uuid4().hex[:8]}", teacher="Not A Name")


def _seqs(n=6) -> list[Sequence]:
    rng = np.random.default_rng(3)
    return [Sequence(token_ids=rng.integers(0, 128, 20), score_from=4, id=str(i)) for i in range(n)]


def _gauge(g, **labels) -> float:
    return g.labels(**labels)._value.get()


def test_equal_replicas_agree(fleet):
    check = ReplicaCheck({"math": _spec({"math": fleet["math"]}).split("=", 1)[1]}, rate=1.0)
    [r] = check.check("math", _seqs())
    check.close()
    assert r.max_abs_diff < 1e-5 and not r.identity_mismatch
    assert _gauge(metrics.REPLICA_MAX_ABS_DIFF, teacher="math", pair=r.pair) == r.max_abs_diff
    assert _gauge(metrics.REPLICA_IDENTITY_MISMATCH, teacher="math", pair=r.pair) == 0


@pytest.mark.parametrize("odd", ["bfloat16", "other weights"])
def test_a_replica_that_differs_is_named_by_pair(fleet, tiny_model, other_model, odd):
    good = fleet["math"][0]
    with (_teacher(tiny_model, "math", dtype="bfloat16") if odd == "bfloat16" else _teacher(other_model, "math")) as bad:
        pair = "|".join(sorted(f"127.0.0.1:{t.server.grpc_port}" for t in (good, bad)))   # sorted: one name per pair
        url = f"grpc://127.0.0.1:{good.server.grpc_port},127.0.0.1:{bad.server.grpc_port}"
        check = ReplicaCheck({"math": url}, rate=1.0)
        [r] = check.check("math", _seqs())
        check.close()
    assert r.pair == pair and r.max_abs_diff > 1e-3 and r.identity_mismatch
    assert ("dtype" if odd == "bfloat16" else "revision") in r.detail
    assert _gauge(metrics.REPLICA_MAX_ABS_DIFF, teacher="math", pair=pair) > 1e-3
    assert _gauge(metrics.REPLICA_IDENTITY_MISMATCH, teacher="math", pair=pair) == 1


def test_the_scorer_samples_real_traffic_for_the_check(redis, fleet):
    exp = f"s{uuid.uuid4().hex[:8]}"
    math_only = {"math": fleet["math"]}
    pair = "|".join(sorted(f"127.0.0.1:{t.server.grpc_port}" for t in fleet["math"]))
    metrics.REPLICA_MAX_ABS_DIFF.labels("math", pair).set(-1)
    with RolloutProducer(redis, exp) as p:
        p.push(_rollouts(20, "s"))
    with running_scorer(redis, "grpc://unused:1", teachers=_spec(math_only), replica_check_rate=1.0) as sc:
        assert len(drain_scored(redis, exp, 20)) == 20
        for _ in range(100):
            if _gauge(metrics.REPLICA_MAX_ABS_DIFF, teacher="math", pair=pair) >= 0:
                break
            time.sleep(0.1)
        assert sc.agreement is not None
    assert 0 <= _gauge(metrics.REPLICA_MAX_ABS_DIFF, teacher="math", pair=pair) < 1e-5


def test_bad_teacher_specs_fail_at_start_up():
    from opd_services.errors import ConfigError
    for spec, words in (("math", "NAME=URL"), ("math=grpc://a:1;math=grpc://b:1", "twice"),
                        ("Math=grpc://a:1", "NAME=URL"), ("math=ftp://a:1", "scheme"), (";", "names no teacher")):
        with pytest.raises(ConfigError, match=words) as e:
            Settings.load(teachers=spec)
        assert "OPD_TEACHERS" in str(e.value)
    assert list(Settings.load(teachers="math=grpc://a:1,b:2;code=http://c:8000").teacher_urls()) == ["math", "code"]
    assert Settings.load(teacher_url="grpc://h:1,h2:1").teacher_urls() == {"default": "grpc://h:1,h2:1"}


def test_opd_fleet_check_on_an_experiments_latest_rollouts(redis, fleet, tiny_model, capsys):
    from opd_services.cli import main
    exp = f"k{uuid.uuid4().hex[:8]}"
    with RolloutProducer(redis, exp) as p:
        p.push(_rollouts(5, "k", teacher="math"))
    args = ["fleet", "check", "--experiment", exp, "--redis-url", redis, "--count", "4"]
    assert main(args + ["--teachers", _spec(fleet)]) == 0
    out = capsys.readouterr().out
    assert "math 127.0.0.1:" in out and " ok" in out
    with _teacher(tiny_model, "math", dtype="bfloat16") as odd:
        spec = f"math=grpc://127.0.0.1:{fleet['math'][0].server.grpc_port},127.0.0.1:{odd.server.grpc_port}"
        assert main(args + ["--teachers", spec]) == 1
    assert "DISAGREE" in capsys.readouterr().out and f":{odd.server.grpc_port}" in out + spec
    assert main(args + ["--teachers", _spec(fleet), "--teacher", "physics"]) == 2
    assert "unknown teacher 'physics'" in capsys.readouterr().err
