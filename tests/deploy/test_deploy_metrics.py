"""Every metric the Grafana dashboard and the alert rules read is exported by the code.

Teacher metrics are checked on a real teacher (the session `teacher` fixture: HTTP + gRPC on
loopback, tiny torch model): score once over each surface, scrape /metrics, find the series.
Queue and trainer metrics come from `opd scorer` / `opd train` processes, which these tests do
not start; they are checked against the names defined in opd_services.metrics (the process
registry), which is what those processes export."""
from __future__ import annotations

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import opd_services.metrics  # noqa: F401  (registers every OPD metric)
from deploy_helpers import dashboard_exprs, promql_names, rule_exprs, sample_names

OTHER_PROCESSES = ("opd_queue_", "opd_trainer_", "opd_teacher_replica_")  # exported by the scorer and the trainer


def used_names() -> set[str]:
    names = set()
    for expr in dashboard_exprs() + rule_exprs():
        names |= promql_names(expr)
    return names


def test_extraction_sees_the_names():
    assert promql_names('sum(rate(opd_requests_total{code=~"5.."}[5m])) / opd_x_bucket') == {
        "opd_requests_total", "opd_x_bucket"}
    assert promql_names('opd_trainer_loss{experiment=~"$experiment"}') == {"opd_trainer_loss"}
    assert len(used_names()) >= 20


def test_every_used_metric_is_defined():
    defined = sample_names(REGISTRY)
    missing = used_names() - defined
    assert not missing, f"dashboard/rules use metrics that opd_services.metrics does not define: {sorted(missing)}"
    assert "opd_no_such_metric_total" not in defined


def test_every_defined_metric_is_watched():
    """The other direction: a metric nobody charts or alerts on is probably a forgotten one."""
    families = {n.removesuffix(s) for n in used_names() for s in ("_bucket", "_sum", "_count", "_total", "_info")
                if n.endswith(s)} | used_names()
    unwatched = [f.name for f in REGISTRY.collect() if f.name.startswith("opd_") and f.name not in families]
    assert not unwatched, (f"metrics defined but on no panel and in no rule: {unwatched}; add a panel in "
                           "monitoring/grafana/dashboard.py (then `make dashboard`) or an alert in monitoring/rules/")


def _score_once(teacher) -> None:
    from opd_client import TeacherClient
    body = {"top_k": 2, "sequences": [{"id": "m", "token_ids": [1, 5, 7, 9, 11], "score_from": 2}]}
    r = httpx.post(f"{teacher.http_url}/v1/score", json=body, timeout=60)
    assert r.status_code == 200, r.text
    with TeacherClient(teacher.grpc_url) as client:
        client.score([[1, 5, 7, 9]], top_k=0)
    r = httpx.post(f"{teacher.http_url}/v1/generate", json={"prompts": [{"token_ids": [1, 5]}], "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_running_teacher_exports_every_used_teacher_metric(teacher):
    _score_once(teacher)
    bad = httpx.post(f"{teacher.http_url}/v1/score", json={"sequences": [{"token_ids": [1]}]}, timeout=10)
    assert bad.status_code == 422                               # labelled counters export once used
    text = httpx.get(f"{teacher.http_url}/metrics", timeout=10).text
    scraped = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    teacher_used = {n for n in used_names() if not n.startswith(OTHER_PROCESSES)}
    missing = teacher_used - scraped
    assert not missing, f"the running teacher does not export {sorted(missing)}"
    assert {"opd_scored_tokens_total", "opd_request_latency_seconds_bucket", "opd_engine_info"} <= scraped
