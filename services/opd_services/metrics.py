"""Prometheus metrics (prefix `opd_`), defined once for the process.

Names here are the contract for monitoring/: the dashboard and alert rules use only these
(a test checks). Experiment labels take registered names only, so cardinality stays
bounded; requests without tenancy are accounted to "default".
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# --- teacher ---
REQUESTS = Counter("opd_requests_total", "Requests served", ["route", "code", "experiment"])
REQUEST_LATENCY = Histogram("opd_request_latency_seconds", "Request latency, received to answered",
                            ["route"], buckets=LATENCY_BUCKETS)
SCORED_TOKENS = Counter("opd_scored_tokens_total", "Tokens scored (positions >= score_from)", ["experiment"])
GENERATED_TOKENS = Counter("opd_generated_tokens_total", "Tokens sampled by the teacher (POST /v1/generate)", ["experiment"])
TEACHER_SECONDS = Counter("opd_teacher_seconds_total", "Engine seconds spent, shared out by tokens", ["experiment"])
TEACHER_ENGINE_SECONDS = Counter("opd_teacher_engine_seconds_total",
                                 "Engine seconds spent, by work: score (forward passes) or generate (decoding)",
                                 ["experiment", "kind"])
BATCH_SEQUENCES = Histogram("opd_batch_sequences", "Sequences per engine batch",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_TOKENS = Histogram("opd_batch_tokens", "Padded tokens per engine batch",
                         buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536))
BATCH_PADDING = Histogram("opd_batch_padding_ratio", "Share of a batch's tokens that are padding",
                          buckets=(0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1))
CANCELLED = Counter("opd_requests_cancelled_total", "Requests given up by their caller (gRPC deadline or "
                    "cancel, HTTP disconnect) while sequences were still queued; those never reach the engine",
                    ["experiment"])
REJECTIONS = Counter("opd_rejections_total", "Requests refused before scoring", ["experiment", "reason"])
FORWARD_SECONDS = Histogram("opd_forward_seconds", "Engine time per batch", buckets=LATENCY_BUCKETS)
INFLIGHT_TOKENS = Gauge("opd_inflight_tokens", "Tokens accepted and not yet answered")
QUEUED_SEQUENCES = Gauge("opd_batcher_queued_sequences", "Sequences waiting for the engine")
ENGINE_INFO = Info("opd_engine", "The teacher model and engine being served")
READY = Gauge("opd_ready", "1 when the engine is loaded and the service accepts requests")
# prefix sharing: a prefix token is computed once, then reused by the other sequences of its batch
# ("batch") or by later batches through the prefix KV cache ("cache"); hit rate = hit / (hit + miss)
PREFIX_TOKENS = Counter("opd_prefix_tokens_total", "Shared-prefix tokens by source: computed, batch (reused "
                        "within a batch), cache (reused from the prefix KV cache)", ["engine", "source"])
PREFIX_CACHE_LOOKUPS = Counter("opd_prefix_cache_lookups_total", "Prefix KV cache lookups by result (hit, miss)",
                               ["engine", "result"])
PREFIX_CACHE_BYTES = Gauge("opd_prefix_cache_bytes", "Bytes held by the prefix KV cache", ["engine"])

# --- queue (scorer process) ---
QUEUE_BACKLOG = Gauge("opd_queue_backlog", "Entries not yet delivered to the stream's group", ["experiment", "stream"])
QUEUE_PENDING = Gauge("opd_queue_pending", "Entries delivered and not yet acked", ["experiment", "stream"])
QUEUE_SCORED = Counter("opd_queue_scored_total", "Rollouts scored and published", ["experiment"])
QUEUE_DEAD = Counter("opd_queue_dead_total", "Rollouts dead-lettered (can never be scored)", ["experiment", "reason"])
QUEUE_RECLAIMED = Counter("opd_queue_reclaimed_total", "Pending entries reclaimed from a dead consumer", ["experiment", "stream"])
QUEUE_TEACHER_RETRIES = Counter("opd_queue_teacher_retries_total", "Scorer retries after a transient teacher failure")
REPLICA_MAX_ABS_DIFF = Gauge("opd_teacher_replica_max_abs_diff",
                             "Largest |logprob difference| between two replicas of a teacher on the last sampled check",
                             ["teacher", "pair"])
REPLICA_IDENTITY_MISMATCH = Gauge("opd_teacher_replica_identity_mismatch",
                                  "1 when two replicas of a teacher report a different revision, dtype or name",
                                  ["teacher", "pair"])

# --- trainer ---
TRAINER_STEP = Gauge("opd_trainer_step", "Optimizer steps taken", ["experiment"])
TRAINER_LOSS = Gauge("opd_trainer_loss", "Loss of the last step", ["experiment"])
TRAINER_REVERSE_KL = Gauge("opd_trainer_reverse_kl", "Mean per-token reverse KL(student || teacher) of the last step", ["experiment"])
TRAINER_TEACHER_TOKENS = Counter("opd_trainer_teacher_tokens_total", "Teacher-scored tokens consumed", ["experiment"])
TRAINER_EVAL_ACCURACY = Gauge("opd_trainer_eval_accuracy", "Held-out exact-match accuracy", ["experiment"])


def scrape_sum(metrics_url: str, name: str) -> float:
    """The sum of every sample of one metric (all label sets) on a running process's /metrics
    page: what the benches read from a teacher they started (name as exported, e.g. with _total)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(metrics_url, timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)
