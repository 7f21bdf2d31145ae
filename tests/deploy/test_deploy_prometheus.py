"""A real Prometheus (Debian's `prometheus`) scrapes a running teacher, scorer and trainer with a
test copy of monitoring/prometheus.yml (same jobs and paths; static loopback targets instead of
Docker DNS; 1 s scrape and evaluation) and the alert rules (same expressions; `for:` cut to
seconds). Checked: every target up; every dashboard and alert expression evaluates and returns
series once traffic has flowed; killing the teacher takes OPDTeacherDown through pending to
firing; rollouts piling up that nothing can score fire OPDQueueBacklogGrowing, and with no scorer
at all (nothing exports the backlog then) OPDScorersDown fires."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml

from deploy_helpers import REPO, RULES, dashboard_exprs, free_port, require_tool, rule_exprs, wait_http
from opd_services.redis_embed import EmbeddedRedis

FOR = "4s"                       # every rule's `for:` in the test copy
EXP = "promexp"


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$experiment", ".*")


def _with_bool(expr: str) -> str:
    """A rule's expression with its threshold comparisons turned into 0/1 (`> bool 2.5`), so it
    returns its series whether or not the alert condition holds."""
    return re.sub(r"(==|!=|>=|<=|>|<)\s*(?=-?\d)", r"\1 bool ", expr)


class Stack:
    """Processes of one box: Valkey, teacher, scorer, trainer (venv) and Prometheus."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, {}
        self.ports = {n: free_port() for n in ("http", "grpc", "scorer", "trainer", "prom")}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def prometheus_config(stack: Stack, rules_path) -> dict:
    cfg = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(rules_path)]
    port_of = {"opd-teacher": stack.ports["http"], "opd-scorer": stack.ports["scorer"],
               "opd-trainer": stack.ports["trainer"]}
    for job in cfg["scrape_configs"]:
        (sd,) = job.pop("dns_sd_configs")
        assert sd["port"] in (8000, 9100, 9101), f"{job['job_name']} scrapes port {sd['port']}"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port_of[job['job_name']]}"]}]
    return cfg


def fast_rules() -> dict:
    rules = yaml.safe_load(RULES.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            if "for" in r:
                r["for"] = FOR
    return rules


@pytest.fixture(scope="module")
def stack(tmp_path_factory, cache_dir):
    prometheus = require_tool("prometheus")
    from opd_services.tasks.models import task_teacher
    tmp = tmp_path_factory.mktemp("prom")
    s = Stack(tmp)
    py = [sys.executable, "-m", "opd_services.cli"]
    with EmbeddedRedis() as redis:
        try:
            s.start("teacher", [*py, "serve"], {
                "OPD_MODEL": str(task_teacher(cache_dir)), "OPD_HOST": "127.0.0.1", "OPD_DEVICE": "cpu",
                "OPD_HTTP_PORT": str(s.ports["http"]), "OPD_GRPC_PORT": str(s.ports["grpc"])})
            _wait(f"http://127.0.0.1:{s.ports['http']}/readyz", s, "teacher")
            teacher = f"grpc://127.0.0.1:{s.ports['grpc']}"
            # the scorer sees the teacher as two replicas (two names of one server) and compares
            # every batch on both, so the replica-agreement panels and alerts have series
            replicas = f"grpc://127.0.0.1:{s.ports['grpc']},localhost:{s.ports['grpc']}"
            s.start("scorer", [*py, "scorer"], {"OPD_REDIS_URL": redis.url, "OPD_TEACHER_URL": replicas,
                                                "OPD_REPLICA_CHECK_RATE": "1",
                                                "OPD_SCORER_METRICS_PORT": str(s.ports["scorer"]),
                                                "OPD_SCORER_GAUGES_S": "0.5", "OPD_SCORER_BATCH_SIZE": "8",
                                                "OPD_QUEUE_RECLAIM_IDLE_S": "2"})
            s.start("trainer", [*py, "train", "--out", str(tmp / "train"), "--steps", "100000", "--batch-size", "8",
                                "--eval-every", "2", "--eval-size", "8", "--no-progress", "--experiment", EXP],
                    {"OPD_REDIS_URL": redis.url, "OPD_TEACHER_URL": teacher, "OPD_CACHE_DIR": str(cache_dir),
                     "OPD_TRAINER_METRICS_PORT": str(s.ports["trainer"])})
            rules = tmp / "rules.yml"
            rules.write_text(yaml.safe_dump(fast_rules()))
            (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(s, rules)))
            s.start("prometheus", [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{s.ports['prom']}"], {})
            _wait(f"http://127.0.0.1:{s.ports['prom']}/-/ready", s, "prometheus")
            s.redis = redis
            yield s
        finally:
            s.stop()


def _wait(url: str, s: Stack, name: str, timeout: float = 180) -> None:
    wait_http(url, s.procs[name], lambda: s.log(name), timeout)


def query(s: Stack, expr: str) -> list:
    r = httpx.get(f"http://127.0.0.1:{s.ports['prom']}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]["result"]


def until(check, timeout: float, what: str, s: Stack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(1)
    pytest.fail(f"{what} within {timeout}s; logs:\n" + "\n".join(f"--{n}--\n{s.log(n)}" for n in s.procs))


def traffic(s: Stack) -> None:
    """What a day brings: scores over both surfaces, a generate, a bad request, a dead letter,
    and a scorer that died holding a rollout (the running scorer reclaims it)."""
    import redis
    from opd_client import Sequence, TeacherClient
    from opd_client.queue import GROUP_SCORERS, Rollout, RolloutProducer, rollouts_key
    from opd_client.queue.keys import ensure_group
    http = f"http://127.0.0.1:{s.ports['http']}"
    body = {"top_k": 2, "sequences": [{"token_ids": [1, 5, 7, 9], "score_from": 2}]}
    assert httpx.post(f"{http}/v1/score", json=body, timeout=60).status_code == 200
    assert httpx.post(f"{http}/v1/score", json={"sequences": [{"token_ids": [1]}]}, timeout=10).status_code == 422
    assert httpx.post(f"{http}/v1/generate", json={"prompts": [{"token_ids": [1, 5]}], "max_tokens": 2},
                      timeout=60).status_code == 200
    with TeacherClient(f"grpc://127.0.0.1:{s.ports['grpc']}") as c:
        c.score([Sequence(token_ids=[1, 5, 7, 9], score_from=1)])
    with RolloutProducer(s.redis.url, EXP) as q:      # out of the 64-token vocabulary: dead-lettered
        q.push([Rollout(id="dead", token_ids=np.array([1, 2, 99999], np.int32), score_from=1)])
    with RolloutProducer(s.redis.url, "crashed") as q:  # a new experiment: the scorer finds it in ~2 s
        q.push([Rollout(id="held", token_ids=np.array([1, 2, 3], np.int32), score_from=1)])
    r = redis.Redis.from_url(s.redis.url)
    ensure_group(r, rollouts_key("crashed"), GROUP_SCORERS)
    assert r.xreadgroup(GROUP_SCORERS, "crashed-scorer", {rollouts_key("crashed"): ">"}, count=1)


def test_every_target_is_up(stack):
    jobs = {"opd-teacher", "opd-scorer", "opd-trainer"}
    up = until(lambda: (r := query(stack, "up")) and {x["metric"]["job"] for x in r} == jobs
               and all(x["value"][1] == "1" for x in r) and r, 120, "every target up == 1", stack)
    assert len(up) == 3


def test_every_dashboard_and_rule_expression_returns_series(stack):
    traffic(stack)
    exprs = [_grafana_to_promql(e) for e in dashboard_exprs() if not e.startswith("label_values(")]
    exprs += [_with_bool(e) for e in rule_exprs()]
    until(lambda: query(stack, "opd_trainer_eval_accuracy") and query(stack, "opd_queue_dead_total")
          and query(stack, 'opd_trainer_step > 2') and query(stack, "opd_queue_reclaimed_total"), 240, "trainer steps, evals and a dead letter", stack)
    time.sleep(3)                                       # a few scrapes after the last traffic
    empty = [e for e in exprs if not query(stack, e)]
    assert not empty, "no series after traffic:\n" + "\n".join(empty)
    assert _with_bool("x > 2.5 and y == 0") == "x > bool 2.5 and y == bool 0"


def _alert_states(s: Stack, name: str) -> set[str]:
    r = httpx.get(f"http://127.0.0.1:{s.ports['prom']}/api/v1/alerts", timeout=10).json()
    return {a["state"] for a in r["data"]["alerts"] if a["labels"]["alertname"] == name}


def test_killing_the_teacher_fires_teacher_down(stack):
    assert not _alert_states(stack, "OPDTeacherDown")
    stack.procs["teacher"].send_signal(signal.SIGKILL)
    until(lambda: "pending" in _alert_states(stack, "OPDTeacherDown"), 30, "OPDTeacherDown pending", stack)
    until(lambda: "firing" in _alert_states(stack, "OPDTeacherDown"), 30, "OPDTeacherDown firing", stack)


def test_rollouts_piling_up_fire_backlog_growing(stack):
    """The teacher is down (previous test): the scorer cannot score, rollouts pile up."""
    from opd_client.queue import Rollout, RolloutProducer
    assert stack.procs["teacher"].poll() is not None
    stack.procs["trainer"].terminate()                 # its own rollouts would muddy the count
    with RolloutProducer(stack.redis.url, "pileup") as q:
        for burst in range(3):
            q.push([Rollout(id=f"p{burst}-{i}", token_ids=np.array([1, 2, 3], np.int32), score_from=1)
                    for i in range(60)])
            time.sleep(1.5)
    until(lambda: "firing" in _alert_states(stack, "OPDQueueBacklogGrowing"), 60,
          "OPDQueueBacklogGrowing firing", stack)


def test_no_scorer_fires_scorers_down(stack):
    """With no scorer, rollouts pile up and nothing exports the backlog: OPDScorersDown says so."""
    from opd_client.queue import Rollout, RolloutProducer
    stack.procs["scorer"].terminate()
    stack.procs["scorer"].wait(30)
    with RolloutProducer(stack.redis.url, "pileup") as q:
        q.push([Rollout(id=f"late-{i}", token_ids=np.array([1, 2, 3], np.int32), score_from=1) for i in range(20)])
    until(lambda: "pending" in _alert_states(stack, "OPDScorersDown"), 60, "OPDScorersDown pending", stack)
    until(lambda: "firing" in _alert_states(stack, "OPDScorersDown"), 60, "OPDScorersDown firing", stack)
