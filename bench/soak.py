"""Soak: mixed load on a teacher and a scorer for N minutes (not in `make test`).

    .venv/bin/python bench/soak.py --minutes 10          # writes bench/soak.png and bench/soak.json

Processes, as users run them: embedded Valkey with the experiments registry (2 experiments,
auth on), `opd serve` (the embedded default teacher, torch on CPU), `opd scorer` (restarted
with SIGTERM once a minute). Load from this process: 32 direct-scoring clients (16 gRPC, 16
HTTP, each experiment's key; 64 tokens, top-4, every THINK_S), teacher generation (2 x 16
tokens a second), rollouts of 2 experiments through the queue (8 x 48 tokens a second each,
consumed and acked by a trainer per experiment), admin calls every 5 s. Held to: 0 errors, every rollout scored once and
none dead, RSS of teacher and scorer after the first minute grows <= 5%, open fds flat. Prints
each figure next to its target; plots p50 / p99 latency of direct scoring per minute.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil

from opd_client import AsyncTeacherClient, TeacherClient
from opd_client.queue import RolloutProducer, ScoredConsumer, dead_key
from opd_client.queue.connection import connect
from opd_client.types import Rollout
from opd_services.metrics import scrape_sum
from opd_services.redis_embed import EmbeddedRedis
from opd_services.teacher.process import TeacherProcess
from opd_services.tenancy.registry import Registry
from verdict import verdict    # bench/verdict.py (a script's own folder is first on sys.path)


HERE = Path(__file__).parent
ADMIN = "soak-admin-key-0123456789"
EXPERIMENTS = ("soak-a", "soak-b")
THINK_S = 2.0        # each scoring client's pause between requests: a steady load the CPU teacher keeps up with


class Soak:
    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.errors: Counter = Counter()
        self.latency = defaultdict(list)          # minute -> direct scoring latencies (s)
        self.samples: list[dict] = []             # resource samples
        self.scorer_rss: list[float] = []         # each scorer's RSS (MB) just before its restart
        self.pushed = Counter()
        self.consumed = Counter()
        self.requests = Counter()

    def minute(self) -> int:
        return int((time.monotonic() - self.t0) // 60)

    def error(self, where: str, e: Exception) -> None:
        self.errors[f"{where}: {type(e).__name__}: {str(e)[:120]}"] += 1

    # ---- load -------------------------------------------------------------------------------

    async def direct(self, url: str, key: str, vocab: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        async with AsyncTeacherClient(url, api_key=key, timeout=60) as c:
            while not self.stop.is_set():
                seqs = [rng.integers(0, vocab, 64).tolist()]
                t = time.monotonic()
                try:
                    out = await c.score(seqs, top_k=4)
                    assert len(out.results) == 1 and out.results[0].logprobs_T.shape == (63,)
                    self.latency[self.minute()].append(time.monotonic() - t)
                    self.requests["score"] += 1
                except Exception as e:  # noqa: BLE001 - counted: the soak is held to zero
                    self.error("score", e)
                await asyncio.sleep(THINK_S)

    async def generate(self, url: str, key: str) -> None:
        async with AsyncTeacherClient(url, api_key=key, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    out = await c.generate([[1, 2, 3], [4, 5]], max_tokens=16, seed=1)
                    assert len(out.results) == 2
                    self.requests["generate"] += 1
                except Exception as e:  # noqa: BLE001
                    self.error("generate", e)
                await asyncio.sleep(1.0)

    async def admin(self, url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as h:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    for r in (await h.get("/v1/admin/experiments"), await h.get(f"/v1/admin/experiments/{EXPERIMENTS[0]}"),
                              await h.patch(f"/v1/admin/experiments/{EXPERIMENTS[1]}", json={"weight": 1 + i % 2}),
                              await h.get(f"/v1/experiments/{EXPERIMENTS[0]}/usage")):
                        r.raise_for_status()
                    self.requests["admin"] += 4
                except Exception as e:  # noqa: BLE001
                    self.error("admin", e)
                await asyncio.sleep(5.0)

    def produce(self, redis_url: str, exp: str, vocab: int) -> None:
        rng, n = np.random.default_rng(hash(exp) % 1000), 0
        with RolloutProducer(redis_url, exp) as q:
            while not self.stop.is_set():
                toks = rng.integers(0, vocab, (8, 48))
                batch = [Rollout(id=f"{exp}-{n + i}", token_ids=toks[i], score_from=16) for i in range(8)]
                try:
                    q.push(batch)
                    n += 8
                    self.pushed[exp] += 8
                except Exception as e:  # noqa: BLE001
                    self.error("push", e)
                time.sleep(1.0)

    def consume(self, redis_url: str, exp: str, until: threading.Event) -> None:
        seen: set[str] = set()
        with ScoredConsumer(redis_url, exp, consumer=f"soak-trainer-{exp}", idle_reclaim_s=30) as q:
            while not until.is_set():
                try:
                    batch = q.read(count=256, block_ms=200)
                    q.ack([eid for eid, _ in batch])
                except Exception as e:  # noqa: BLE001
                    self.error("consume", e)
                    continue
                for _, s in batch:
                    if s.rollout.id in seen:
                        self.errors[f"consume: {s.rollout.id} delivered twice"] += 1
                    seen.add(s.rollout.id)
                self.consumed[exp] = len(seen)

    # ---- processes ----------------------------------------------------------------------------

    def sample(self, teacher_pid: int, scorer: list, metrics_url: str) -> None:
        while not self.stop.wait(5.0):
            row = {"t": time.monotonic() - self.t0}
            try:        # the prefix cache is bounded memory by design: sampled, so RSS can be read beside it
                row["prefix_cache_mb"] = scrape_sum(metrics_url, "opd_prefix_cache_bytes") / 2**20
            except (httpx.HTTPError, ValueError, IndexError) as e:
                self.error("metrics", e)
            for name, pid in (("teacher", teacher_pid), ("scorer", scorer[0].pid)):
                try:
                    p = psutil.Process(pid)
                    row[f"{name}_rss_mb"], row[f"{name}_fds"] = p.memory_info().rss / 2**20, p.num_fds()
                except psutil.Error:
                    pass
            self.samples.append(row)


def start_scorer(teacher_url: str, redis_url: str) -> subprocess.Popen:
    env = {**os.environ, "OPD_TEACHER_URL": teacher_url, "OPD_REDIS_URL": redis_url, "OPD_TEACHER_API_KEY": ADMIN,
           "OPD_SCORER_METRICS_PORT": "0", "OPD_LOG_LEVEL": "warning", "OPD_DRAIN_TIMEOUT_S": "10"}
    return subprocess.Popen([sys.executable, "-m", "opd_services.cli", "scorer"], env=env)


def restart_scorers(soak: Soak, scorer: list, teacher_url: str, redis_url: str) -> int:
    restarts = 0
    while not soak.stop.wait(60.0):
        try:
            soak.scorer_rss.append(psutil.Process(scorer[0].pid).memory_info().rss / 2**20)
        except psutil.Error:
            pass
        scorer[0].send_signal(signal.SIGTERM)
        if scorer[0].wait(30) != 0:
            soak.errors[f"scorer exited with {scorer[0].returncode} on SIGTERM"] += 1
        scorer[0] = start_scorer(teacher_url, redis_url)
        restarts += 1
    return restarts


def growth(rows: list[dict], key: str, after_s: float = 60.0) -> tuple[float, float, float]:
    """(value at the first sample after `after_s`, the last value, relative growth)."""
    vals = [r[key] for r in rows if r["t"] >= after_s and key in r]
    if len(vals) < 2:
        return float("nan"), float("nan"), float("nan")
    return vals[0], vals[-1], vals[-1] / vals[0] - 1


def plot(latency: dict, path: Path) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [{"minute": m + 1, "n": len(v), "p50_ms": 1000 * float(np.percentile(v, 50)),
             "p99_ms": 1000 * float(np.percentile(v, 99))} for m, v in sorted(latency.items()) if v]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["minute"] for r in rows], [r["p50_ms"] for r in rows], "o-", label="p50")
    ax.plot([r["minute"] for r in rows], [r["p99_ms"] for r in rows], "s-", label="p99")
    ax.set_xlabel("minute of the soak")
    ax.set_ylabel("direct score latency (ms)")
    ax.set_title("Soak: 32 scoring clients + generate + queue + admin, scorer restarted each minute", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return rows


def line(name: str, value: float, op: str, target: float) -> str:
    return f"{name:<52} {value:10.3f}  {verdict(value, target, op)}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", default=str(HERE / "soak"), help="writes OUT.png and OUT.json")
    ap.add_argument("--prefix-cache-mb", default="32",
                    help="the teacher's OPD_PREFIX_CACHE_MB. The default, 32, fills within the first minute (~35 MB of prefixes a minute here), so "
                         "RSS growth after it measures leaks; 'machine' leaves it unset (1/16 of RAM, up to 2 GB), "
                         "and RSS then grows as the cache fills, by design")
    args = ap.parse_args()
    soak = Soak(args.minutes)
    with EmbeddedRedis() as redis:
        reg = Registry(connect(redis.url))
        keys = {e: reg.create(e).api_key for e in EXPERIMENTS}
        cache = {} if args.prefix_cache_mb == "machine" else {"OPD_PREFIX_CACHE_MB": args.prefix_cache_mb}
        with TeacherProcess(OPD_REDIS_URL=redis.url, OPD_ADMIN_KEY=ADMIN, OPD_AUTH="on", **cache) as t:
            with TeacherClient(t.http_url, api_key=keys[EXPERIMENTS[0]]) as c:
                vocab = c.model().vocab_size
            scorer = [start_scorer(t.grpc_url, redis.url)]
            soak.t0 = time.monotonic()
            drained = threading.Event()
            threads = [threading.Thread(target=soak.produce, args=(redis.url, e, vocab)) for e in EXPERIMENTS]
            threads += [threading.Thread(target=soak.consume, args=(redis.url, e, drained)) for e in EXPERIMENTS]
            threads += [threading.Thread(target=soak.sample, args=(t.proc.pid, scorer, t.http_url + "/metrics"))]
            restarts = [0]
            threads += [threading.Thread(target=lambda: restarts.__setitem__(0, restart_scorers(
                soak, scorer, t.grpc_url, redis.url)))]
            for th in threads:
                th.start()

            async def load():
                tasks = [soak.direct(t.grpc_url if i % 2 else t.http_url, keys[EXPERIMENTS[i % 2]], vocab, i)
                         for i in range(32)]
                tasks += [soak.generate(t.grpc_url, keys[EXPERIMENTS[0]]), soak.admin(t.http_url)]
                stopper = asyncio.get_running_loop().run_in_executor(None, lambda: soak.stop.wait(soak.seconds) or
                                                                     soak.stop.set())
                await asyncio.gather(stopper, *tasks)
            asyncio.run(load())
            for th in threads[:2]:
                th.join()
            deadline = time.monotonic() + 120          # the queue drains: every rollout scored once
            while sum(soak.consumed.values()) < sum(soak.pushed.values()) and time.monotonic() < deadline:
                time.sleep(0.5)
            drained.set()
            for th in threads[2:]:
                th.join(90)
            dead = sum(connect(redis.url).xlen(dead_key(e)) for e in EXPERIMENTS)
            scorer[0].send_signal(signal.SIGTERM)
            scorer[0].wait(30)
    out = Path(args.out)
    per_minute = plot(soak.latency, out.with_suffix(".png"))
    t_rss, s_fd = growth(soak.samples, "teacher_rss_mb"), growth(soak.samples, "teacher_fds")
    cache_mb = growth(soak.samples, "prefix_cache_mb")
    sc = soak.scorer_rss
    sc_growth = sc[-1] / sc[0] - 1 if len(sc) >= 2 else float("nan")
    lost = sum(soak.pushed.values()) - sum(soak.consumed.values())
    errors = sum(soak.errors.values())
    report = {"minutes": args.minutes, "requests": dict(soak.requests), "pushed": sum(soak.pushed.values()),
              "consumed": sum(soak.consumed.values()), "dead": dead, "errors": dict(soak.errors),
              "scorer_restarts": restarts[0], "teacher_rss_mb_after_1min_and_end": t_rss[:2],
              "prefix_cache_mb_after_1min_and_end": cache_mb[:2], "prefix_cache_mb_setting": args.prefix_cache_mb,
              "teacher_fds_after_1min_and_end": s_fd[:2], "scorer_rss_mb_before_each_restart": sc,
              "per_minute": per_minute, "samples": soak.samples}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("per_minute", "samples")}, indent=1))
    fds = defaultdict(list)
    for r in soak.samples:
        fds[int(r["t"] // 60) + 1].append(r.get("teacher_fds"))
    print("teacher open fds per minute (min..max):",
          " ".join(f"{m}:{min(v)}..{max(v)}" for m, v in sorted(fds.items()) if None not in v))
    print(f"prefix cache (OPD_PREFIX_CACHE_MB={args.prefix_cache_mb}) after minute 1 -> end: "
          f"{cache_mb[0]:.1f} -> {cache_mb[1]:.1f} MB; teacher RSS {t_rss[0]:.1f} -> {t_rss[1]:.1f} MB")
    for r in per_minute:
        print(f"minute {r['minute']:>2}: {r['n']:>6} scores  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms")
    checks = [line("errors (clients, queue, scorer exits)", errors, "==", 0),
              line("rollouts lost or dead", lost + dead, "==", 0),
              line("teacher RSS growth after minute 1", t_rss[2], "<=", 0.05),
              line("scorer RSS growth, last vs first incarnation", sc_growth, "<=", 0.05),
              line("teacher open fds growth after minute 1", s_fd[1] - s_fd[0], "<=", 5)]
    print("\n".join(checks))
    return 0 if all(c.endswith("PASS") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
