"""Build the Grafana dashboard JSON for OPD Teacher: `python monitoring/grafana/dashboard.py`.

Writes monitoring/grafana/dashboards/opd-teacher.json (committed; a test checks it is fresh).
Panels use only metric names from services/opd_services/metrics.py (a test checks every one is
exported). This script only writes JSON: it talks to no Grafana and no Prometheus.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "opd-teacher.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
EXP = 'experiment=~"$experiment"'
SCORE_ROUTES = 'route=~"/v1/score|/opd.teacher.v1.Teacher/Score"'
NOPROBE = 'route!~"/healthz|/readyz|/metrics"'   # /readyz answers 503 while a model loads
SERVER_ERRORS = 'code=~"5..|INTERNAL|UNKNOWN|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"'
RI = "$__rate_interval"


def q(expr: str, legend: str, ref: str = "A") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def quantiles(metric: str, selector: str = "", by: str = "") -> list[dict]:
    """p50 and p99 of a histogram, optionally split by a label."""
    group = f"le{', ' + by if by else ''}"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
              f"{prefix}p{int(p * 100)}", ref) for p, ref in ((0.5, "A"), (0.99, "B"))]


def mean(metric: str, legend: str, ref: str = "A") -> dict:
    return q(f"sum(rate({metric}_sum[{RI}])) / sum(rate({metric}_count[{RI}]))", legend, ref)


def panel(title: str, targets: list[dict], unit: str = "short", kind: str = "timeseries",
          desc: str = "", stack: bool = False) -> dict:
    custom = {"stacking": {"mode": "normal" if stack else "none"}} if kind == "timeseries" else {}
    return {"type": kind, "title": title, "description": desc, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {}}


def teacher_panels() -> list[dict]:
    return [
        panel("Scored tokens/s per experiment", [q(f"sum by (experiment) (rate(opd_scored_tokens_total{{{EXP}}}[{RI}]))", "{{experiment}}")],
              "short", desc="Teacher throughput: positions >= score_from scored per second.", stack=True),
        panel("Generated tokens/s per experiment", [q(f"sum by (experiment) (rate(opd_generated_tokens_total{{{EXP}}}[{RI}]))", "{{experiment}}")],
              "short", desc="Teacher sampling (POST /v1/generate, gRPC Generate): SFT baselines and off-policy data.", stack=True),
        panel("Requests/s by route and code", [q(f"sum by (route, code) (rate(opd_requests_total[{RI}]))", "{{route}} {{code}}")],
              "reqps", desc="HTTP codes (200, 422, 429, 503...) and gRPC status names (OK, INVALID_ARGUMENT...)."),
        panel("Score latency p50 / p99", quantiles("opd_request_latency_seconds", SCORE_ROUTES, "route"), "s",
              desc="Received to answered, /v1/score and gRPC Score. Alert OPDScoreLatencyP99High at p99 > 2.5 s."),
        panel("Engine seconds per 1k tokens, per experiment",
              [q(f"1000 * sum by (experiment) (rate(opd_teacher_seconds_total{{{EXP}}}[{RI}])) / sum by (experiment) (rate(opd_scored_tokens_total{{{EXP}}}[{RI}]))", "{{experiment}}")],
              "s", desc="Per-experiment cost/latency: engine time shared out by tokens, per 1000 scored tokens."),
        panel("Teacher time share per experiment", [q(f"sum by (experiment) (rate(opd_teacher_seconds_total{{{EXP}}}[{RI}]))", "{{experiment}}")],
              "s", desc="Engine seconds per second used by each experiment (fair share at work).", stack=True),
        panel("Teacher engine seconds/s by experiment and kind",
              [q(f"sum by (experiment, kind) (rate(opd_teacher_engine_seconds_total{{{EXP}}}[{RI}]))", "{{experiment}} {{kind}}")],
              "s", desc="Engine time spent scoring (kind=score) and sampling (kind=generate) for each experiment: "
                        "what a distillation run costs the teacher."),
        panel("Cancelled requests/s per experiment",
              [q(f"sum by (experiment) (rate(opd_requests_cancelled_total{{{EXP}}}[{RI}])) or vector(0)", "{{experiment}}")],
              "reqps", desc="Callers that gave up (gRPC deadline, HTTP disconnect) before their sequences ran: "
                            "their queued work was dropped, not scored for nobody."),
        panel("Rejections/s per experiment and reason",
              [q(f"sum by (experiment, reason) (rate(opd_rejections_total{{{EXP}}}[{RI}]))", "{{experiment}} {{reason}}")],
              "reqps", desc="Refused before scoring: quota (429, the experiment is over its in-flight tokens), "
                            "invalid (422), auth (401). A steady quota rate means raise the quota or slow that trainer."),
        panel("Server error ratio", [q(f"(sum(rate(opd_requests_total{{{NOPROBE},{SERVER_ERRORS}}}[{RI}])) or vector(0)) / sum(rate(opd_requests_total{{{NOPROBE}}}[{RI}]))", "errors")],
              "percentunit", desc="Alert OPDTeacherErrorRate above 5%."),
    ]


def batching_panels() -> list[dict]:
    return [
        panel("Batch fill: sequences and padded tokens per batch",
              [mean("opd_batch_sequences", "sequences / batch", "A"), mean("opd_batch_tokens", "padded tokens / batch", "B")],
              desc="Compare tokens / batch with OPD_MAX_BATCH_TOKENS: far below under load means batch_wait_ms is too short."),
        panel("Padding ratio (mean, p90)",
              [mean("opd_batch_padding_ratio", "mean", "A"),
               q(f"histogram_quantile(0.9, sum by (le) (rate(opd_batch_padding_ratio_bucket[{RI}])))", "p90", "B")],
              "percentunit", desc="Share of each batch's tokens that are padding (wasted compute)."),
        panel("Forward time p50 / p99", quantiles("opd_forward_seconds"), "s", desc="Engine time per batch."),
        panel("In-flight tokens and queued sequences",
              [q("sum(opd_inflight_tokens)", "in-flight tokens", "A"), q("sum(opd_batcher_queued_sequences)", "queued sequences", "B")],
              desc="Accepted and not yet answered; waiting for the engine."),
        panel("Prefix sharing: tokens/s computed vs reused",
              [q(f"sum by (engine, source) (rate(opd_prefix_tokens_total[{RI}]))", "{{engine}} {{source}}")],
              desc="Shared-prefix tokens: computed once, reused within a batch (a group's prompt), or reused "
                   "from the prefix KV cache across requests. Reused / computed is the work prefix sharing saves.",
              stack=True),
        panel("Prefix cache: hit rate and bytes",
              [q(f'sum by (engine) (rate(opd_prefix_cache_lookups_total{{result="hit"}}[{RI}])) / '
                 f"sum by (engine) (rate(opd_prefix_cache_lookups_total[{RI}]))", "{{engine}} hit rate", "A"),
               q("sum by (engine) (opd_prefix_cache_bytes) / 2^20", "{{engine}} MB held", "B")],
              desc="Lookups of a prompt's KV across requests that found it; memory held (bounded by "
                   "OPD_PREFIX_CACHE_MB). A low hit rate with a full cache: raise the budget."),
        panel("Teachers ready", [q("sum(opd_ready)", "ready")], "short", "stat",
              desc="Instances whose engine is loaded and that accept requests."),
        panel("Engine and model", [{**q("opd_engine_info", ""), "format": "table", "instant": True}], "short", "table",
              desc="Model name, engine, dtype and revision served by each instance."),
    ]


def queue_panels() -> list[dict]:
    return [
        panel("Queue backlog per experiment", [q(f"max by (experiment, stream) (opd_queue_backlog{{{EXP}}})", "{{experiment}} {{stream}}")],
              desc="Entries not yet delivered to the stream's group. Alert OPDQueueBacklogGrowing."),
        panel("Queue pending per experiment", [q(f"max by (experiment, stream) (opd_queue_pending{{{EXP}}})", "{{experiment}} {{stream}}")],
              desc="Delivered and not yet acked (being scored / trained on, or held by a dead consumer)."),
        panel("Rollouts scored/s per experiment", [q(f"sum by (experiment) (rate(opd_queue_scored_total{{{EXP}}}[{RI}]))", "{{experiment}}")],
              desc="Scorer output: rollouts scored and published.", stack=True),
        panel("Dead letters (last hour) by reason", [q(f"sum by (experiment, reason) (increase(opd_queue_dead_total{{{EXP}}}[1h]))", "{{experiment}} {{reason}}")],
              desc="Rollouts that can never be scored, moved to opd:{EXP}:dead. Alert OPDDeadLetters."),
        panel("Reclaims and teacher retries",
              [q(f"sum by (experiment, stream) (rate(opd_queue_reclaimed_total{{{EXP}}}[{RI}]))", "reclaimed {{experiment}} {{stream}}", "A"),
               q(f"sum(rate(opd_queue_teacher_retries_total[{RI}]))", "scorer retries to teacher", "B")],
              desc="Reclaims: a consumer died holding entries. Retries: transient teacher failures."),
        panel("Teacher replica agreement (max |logprob diff|)",
              [q("max by (teacher, pair) (opd_teacher_replica_max_abs_diff)", "{{teacher}} {{pair}}", "A"),
               q("max by (teacher, pair) (opd_teacher_replica_identity_mismatch)", "identity differs {{teacher}} {{pair}}", "B")],
              desc="Scorers score a sample of traffic on every replica of its teacher (OPD_REPLICA_CHECK_RATE). "
                   "Alerts OPDTeacherReplicasDisagree (> 1e-3) and OPDTeacherReplicaIdentityMismatch."),
    ]


def trainer_panels() -> list[dict]:
    return [
        panel("Trainer loss", [q(f"opd_trainer_loss{{{EXP}}}", "{{experiment}}")], desc="Loss of the last optimizer step."),
        panel("Trainer reverse KL (student || teacher)", [q(f"opd_trainer_reverse_kl{{{EXP}}}", "{{experiment}}")],
              desc="Mean per-token reverse KL of the last step: should fall as the student learns."),
        panel("Trainer step", [q(f"opd_trainer_step{{{EXP}}}", "{{experiment}}")], desc="Optimizer steps taken."),
        panel("Teacher tokens/s consumed by trainers", [q(f"sum by (experiment) (rate(opd_trainer_teacher_tokens_total{{{EXP}}}[{RI}]))", "{{experiment}}")]),
        panel("Eval accuracy", [q(f"opd_trainer_eval_accuracy{{{EXP}}}", "{{experiment}}")], "percentunit",
              desc="Held-out exact-match accuracy."),
    ]


def layout(rows: list[tuple[str, list[dict]]]) -> list[dict]:
    """Rows of panels, three per line (8 of 24 grid units wide, 8 high)."""
    out, y, pid = [], 0, 1
    for title, panels in rows:
        out.append({"type": "row", "title": title, "id": pid, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, p in enumerate(panels):
            out.append({**p, "id": pid, "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)}})
            pid += 1
        y += 8 * ((len(panels) + 2) // 3)
    return out


def templating() -> dict:
    return {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {"text": "Prometheus", "value": "opd-prometheus"}},
        {"name": "experiment", "label": "Experiment", "type": "query", "datasource": DS,
         "query": {"query": "label_values(opd_scored_tokens_total, experiment)", "refId": "experiment"},
         "definition": "label_values(opd_scored_tokens_total, experiment)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
         "current": {"text": "All", "value": "$__all"}},
    ]}


def build() -> dict:
    rows = [("Teacher: throughput and latency", teacher_panels()), ("Batching", batching_panels()),
            ("Queue", queue_panels()), ("Trainer", trainer_panels())]
    return {"uid": "opd-teacher", "title": "OPD Teacher", "tags": ["opd"], "schemaVersion": 39,
            "version": 1, "editable": True, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
            "timezone": "utc", "templating": templating(), "annotations": {"list": []}, "panels": layout(rows)}


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
