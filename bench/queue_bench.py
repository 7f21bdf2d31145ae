"""Queue benchmarks (issue 3). Prints each figure next to its reference, in one run.

  Q1  queue overhead: rollouts/s end to end (producer -> Redis -> scorer -> teacher -> Redis
      -> consumer) vs the same teacher scoring the same rollouts directly; target ratio >= 0.9.
      Teacher: BENCH_MODEL (modeling/checkpoints.py), torch engine, 256-token rollouts.
  Q2  queue alone: the same flow over the uniform engine (scoring cost ~0); target >= 8,000/s.
  Q3  payload: bytes per scored token held in Redis, binary codec vs a JSON encoding.
  Q4  teacher fleet (issue 15): Q1's end-to-end flow against 2 replicas of the torch teacher,
      each pinned to its own core (taskset), vs 1 replica pinned to one core; target >= 1.7x,
      and each replica's share of the scored tokens within 40-60%.
  Q5  grouped rollouts (issue 12): groups of 4 completions of one 128-token prompt, end to end,
      teacher with prefix sharing (the default) vs OPD_PREFIX_SHARING=false; reports the gain.

Every role is its own process: Valkey (embedded), `opd serve`, `opd scorer` x N, one
producer, one consumer. Usage: python bench/queue_bench.py [--only q1,q2,q3,q4,q5] [--q2-n 30000]
This script measures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson

from opd_client import TeacherClient
from opd_client.types import Rollout, ScoredRollout, Sequence
from opd_services.metrics import scrape_sum
from opd_services.redis_embed import EmbeddedRedis, free_port


LENGTH, SCORE_FROM = 256, 32


def rollouts(n: int, vocab: int, prefix: str = "r", seed: int = 0, group: tuple[int, int] = (1, SCORE_FROM)
             ) -> list[Rollout]:
    """n rollouts of LENGTH tokens; group = (G, prompt): every G consecutive ones share a prompt."""
    g, score_from = group
    rng = np.random.default_rng(seed)
    toks = rng.integers(2, vocab, (n, LENGTH))
    for i in range(n):
        toks[i, :score_from] = toks[i - i % g, :score_from]
    blp = -rng.random((n, LENGTH - score_from)).astype(np.float32)
    return [Rollout(id=f"{prefix}{i}", token_ids=toks[i], score_from=score_from, behaviour_logprobs=blp[i],
                    policy_version=1, sampled_at=time.time()) for i in range(n)]


# ---- roles (each in its own process) --------------------------------------------------------

def _produce(url, exp, n, vocab, chunk, ready, go, out, group=(1, SCORE_FROM)):
    from opd_client.queue import RolloutProducer
    data = rollouts(n, vocab, group=group)
    with RolloutProducer(url, exp) as q:
        ready.set()
        go.wait()
        out.put(("start", time.time()))
        for i in range(0, n, chunk):
            q.push(data[i:i + chunk])
        out.put(("pushed", time.time()))


def _consume(url, exp, n, ready, out):
    from opd_client.queue import ScoredConsumer
    seen = 0
    with ScoredConsumer(url, exp, consumer="bench") as q:
        ready.set()
        while seen < n:
            batch = q.read(count=1000, block_ms=1000)
            q.ack([eid for eid, _ in batch])
            seen += len(batch)
    out.put(("done", time.time()))


def _teacher(env: dict, port: int, http_port: int | None = None, cpu: int | None = None) -> subprocess.Popen:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    p = subprocess.Popen([*pin, sys.executable, "-m", "opd_services.cli", "serve", "--grpc-port", str(port),
                          "--http-port", str(http_port or free_port())], env={**os.environ, **env},
                         stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    with TeacherClient(f"grpc://127.0.0.1:{port}", timeout=5) as t:
        while True:
            try:
                t.model()
                return p
            except Exception:  # still loading; the deadline below bounds the wait
                if time.monotonic() > deadline or p.poll() is not None:
                    p.kill()
                    raise RuntimeError("teacher did not become ready")
                time.sleep(0.5)


def _scorers(redis_url: str, teacher_url: str, procs: int, loops: int, batch: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OPD_REDIS_URL": redis_url, "OPD_TEACHER_URL": teacher_url, "OPD_LOG_LEVEL": "warning",
           "OPD_SCORER_CONCURRENCY": str(loops), "OPD_SCORER_BATCH_SIZE": str(batch), "OPD_SCORER_METRICS_PORT": "0",
           "OPD_SCORER_BLOCK_MS": "20"}
    return [subprocess.Popen([sys.executable, "-m", "opd_services.cli", "scorer"], env=env) for _ in range(procs)]


def end_to_end(redis_url: str, teacher_url: str, n: int, vocab: int, *, procs: int, loops: int,
               batch: int, exp: str, group: tuple[int, int] = (1, SCORE_FROM)) -> float:
    """Rollouts/s from the first push to the last scored rollout consumed."""
    ctx = mp.get_context("spawn")
    out, p_ready, c_ready, go = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Event()
    roles = [ctx.Process(target=_produce, args=(redis_url, exp, n, vocab, 200, p_ready, go, out, group)),
             ctx.Process(target=_consume, args=(redis_url, exp, n, c_ready, out))]
    scorers = _scorers(redis_url, teacher_url, procs, loops, batch)
    try:
        for r in roles:
            r.start()
        p_ready.wait(600)
        c_ready.wait(60)
        time.sleep(1.0)                       # scorers connected and blocking on the stream
        go.set()
        marks = dict(out.get(timeout=900) for _ in range(3))
        return n / (marks["done"] - marks["start"])
    finally:
        for s in scorers:
            s.terminate()
        for s in scorers:
            s.wait(30)
        for r in roles:
            r.join(10)


def direct(teacher_url: str, n: int, vocab: int, *, concurrency: int, batch: int) -> float:
    """Rollouts/s when `concurrency` callers send the same rollouts straight to the teacher."""
    data = rollouts(n, vocab, seed=1)
    chunks = [[Sequence(token_ids=r.token_ids, score_from=r.score_from) for r in data[i:i + batch]]
              for i in range(0, n, batch)]
    with TeacherClient(teacher_url, timeout=600) as t:
        t.score(chunks[0][:2])                # warm-up
        t0 = time.time()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda c: t.score(c), chunks))
        return n / (time.time() - t0)


# ---- the three figures ------------------------------------------------------------------------

def q1(redis_url: str, args) -> None:
    from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
    from opd_services.config import Settings
    path = cached_random_llama(Settings().cache_dir, BENCH_MODEL, prefix="bench-model")
    port = free_port()
    teacher = _teacher({"OPD_MODEL": str(path), "OPD_ENGINE": "torch", "OPD_DEVICE": "cpu",
                        "OPD_LOG_LEVEL": "warning"}, port)
    url = f"grpc://127.0.0.1:{port}"
    loops = args.q1_procs * args.q1_loops
    ds, qs = [], []
    try:
        # alternate direct and queued rounds, so that a neighbour's load hits both alike
        for i in range(args.q1_rounds):
            ds.append(direct(url, args.q1_n, BENCH_MODEL.vocab_size, concurrency=loops, batch=args.q1_batch))
            qs.append(end_to_end(redis_url, url, args.q1_n, BENCH_MODEL.vocab_size, procs=args.q1_procs,
                                 loops=args.q1_loops, batch=args.q1_batch, exp=f"bench-q1-{i}"))
    finally:
        teacher.terminate()
        teacher.wait(30)
    rounds = ", ".join(f"{q:.2f}/{d:.2f}" for q, d in zip(qs, ds))
    print(f"Q1 queue overhead (BENCH_MODEL {BENCH_MODEL.tag}, torch CPU, {LENGTH}-token rollouts, "
          f"n={args.q1_n} per round, batch {args.q1_batch}, {loops} scorer loop(s)): end to end {max(qs):,.2f} "
          f"rollouts/s vs teacher direct {max(ds):,.2f} rollouts/s (best of {args.q1_rounds} alternating rounds) "
          f"-> ratio {max(qs) / max(ds):.2f} (target >= 0.90); rounds queue/direct: {rounds}")


def q2(redis_url: str, args) -> None:
    port = free_port()
    teacher = _teacher({"OPD_ENGINE": "uniform", "OPD_LOG_LEVEL": "warning"}, port)
    try:
        rate = end_to_end(redis_url, f"grpc://127.0.0.1:{port}", args.q2_n, 32_000, procs=args.q2_procs,
                          loops=args.q2_loops, batch=args.q2_batch, exp="bench-q2")
    finally:
        teacher.terminate()
        teacher.wait(30)
    print(f"Q2 queue alone (uniform engine, {LENGTH}-token rollouts, n={args.q2_n}, batch {args.q2_batch}, "
          f"{args.q2_procs} scorer process(es) x {args.q2_loops} loop(s)): {rate:,.0f} rollouts/s end to end "
          f"(target >= 8,000/s: ratio {rate / 8000:.2f})")


def q5(redis_url: str, args) -> None:
    from opd_services.config import Settings
    from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
    path = cached_random_llama(Settings().cache_dir, BENCH_MODEL, prefix="bench-model")
    rates = {}
    for name, env in (("shared", {}), ("unshared", {"OPD_PREFIX_SHARING": "false", "OPD_PREFIX_CACHE_MB": "0"})):
        port = free_port()
        teacher = _teacher({"OPD_MODEL": str(path), "OPD_ENGINE": "torch", "OPD_DEVICE": "cpu",
                            "OPD_LOG_LEVEL": "warning", **env}, port)
        try:
            rates[name] = end_to_end(redis_url, f"grpc://127.0.0.1:{port}", args.q1_n, BENCH_MODEL.vocab_size,
                                     procs=1, loops=args.q1_loops, batch=args.q1_batch, exp=f"bench-q5-{name}",
                                     group=(4, 128))
        finally:
            teacher.terminate()
            teacher.wait(30)
    print(f"Q5 grouped rollouts (BENCH_MODEL, torch CPU, groups of 4 x {LENGTH} tokens sharing a 128-token prompt, "
          f"n={args.q1_n}, batch {args.q1_batch}, {args.q1_loops} scorer loops): prefix sharing {rates['shared']:,.2f} "
          f"rollouts/s vs unshared {rates['unshared']:,.2f} -> gain {rates['shared'] / rates['unshared']:.2f}x (report)")


def q3(redis_url: str, n: int = 1000) -> None:
    from opd_client.codec import encode_scored
    from opd_client.queue.connection import connect
    r = connect(redis_url)
    data = rollouts(n, 32_000, seed=3)
    scored = [ScoredRollout(rollout=x, teacher_logprobs=-np.random.default_rng(i).random(x.n_scored),
                            model_revision="sha256:" + "0" * 64, scored_at=time.time()) for i, x in enumerate(data)]
    tokens = sum(x.n_scored for x in data)
    sizes = {}
    for name, enc in (("binary", encode_scored), ("json", _json)):
        key = f"opd:{{bench-q3-{name}}}:scored"
        r.delete(key)
        pipe = r.pipeline(transaction=False)
        for s in scored:
            pipe.xadd(key, {b"d": enc(s)})
        pipe.execute()
        sizes[name] = r.memory_usage(key, samples=0) / tokens
        r.delete(key)
    print(f"Q3 payload ({LENGTH}-token rollouts, {LENGTH - SCORE_FROM} scored tokens each, stream MEMORY USAGE "
          f"of {n} entries): binary {sizes['binary']:.1f} B per scored token vs JSON {sizes['json']:.1f} B "
          f"(JSON / binary = {sizes['json'] / sizes['binary']:.1f}x)")


def _fleet_round(redis_url: str, path, replicas: int, args, exp: str) -> tuple[float, list[float]]:
    """Rollouts/s end to end with `replicas` teachers on cores 0..replicas-1; each one's token share."""
    from opd_services.modeling.checkpoints import BENCH_MODEL
    env = {"OPD_MODEL": str(path), "OPD_ENGINE": "torch", "OPD_DEVICE": "cpu", "OPD_LOG_LEVEL": "warning",
           "OMP_NUM_THREADS": "1"}
    ports = [(free_port(), free_port()) for _ in range(replicas)]
    teachers = [_teacher(env, g, h, cpu=i) for i, (g, h) in enumerate(ports)]
    try:
        url = "grpc://" + ",".join(f"127.0.0.1:{g}" for g, _ in ports)
        rate = end_to_end(redis_url, url, args.q4_n, BENCH_MODEL.vocab_size, procs=1, loops=args.q4_loops,
                          batch=args.q4_batch, exp=exp)
        tokens = [scrape_sum(f"http://127.0.0.1:{h}/metrics", "opd_scored_tokens_total") for _, h in ports]
    finally:
        for t in teachers:
            t.terminate()
        for t in teachers:
            t.wait(30)
    return rate, [t / sum(tokens) for t in tokens]


def q4(redis_url: str, args) -> None:
    from opd_services.config import Settings
    from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
    path = cached_random_llama(Settings().cache_dir, BENCH_MODEL, prefix="bench-model")
    ones, twos, shares = [], [], []
    for i in range(args.q4_rounds):          # alternate, so that a neighbour's load hits both alike
        ones.append(_fleet_round(redis_url, path, 1, args, f"bench-q4-one-{i}")[0])
        rate, share = _fleet_round(redis_url, path, 2, args, f"bench-q4-two-{i}")
        twos.append(rate)
        shares.append(share)
    best = max(range(len(twos)), key=lambda i: twos[i])
    rounds = ", ".join(f"{t:.2f}/{o:.2f}" for t, o in zip(twos, ones))
    print(f"Q4 teacher fleet (BENCH_MODEL {BENCH_MODEL.tag}, torch CPU, 1 core per replica via taskset, "
          f"{LENGTH}-token rollouts, n={args.q4_n} per round, batch {args.q4_batch}, {args.q4_loops} scorer loops): "
          f"2 replicas {twos[best]:,.2f} rollouts/s vs 1 replica {max(ones):,.2f} rollouts/s (best of "
          f"{args.q4_rounds} alternating rounds) -> ratio {twos[best] / max(ones):.2f} (target >= 1.70); "
          f"replica shares of scored tokens {', '.join(f'{x:.0%}' for x in shares[best])} (target 40-60% each); "
          f"rounds two/one: {rounds}")


def _json(s: ScoredRollout) -> bytes:
    r = s.rollout
    return orjson.dumps({"id": r.id, "token_ids": r.token_ids.tolist(), "score_from": r.score_from,
                         "behaviour_logprobs": r.behaviour_logprobs.tolist(), "policy_version": r.policy_version,
                         "sampled_at": r.sampled_at, "teacher_logprobs": s.teacher_logprobs.tolist(),
                         "model_revision": s.model_revision, "scored_at": s.scored_at})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="q1,q2,q3,q4,q5")
    p.add_argument("--q1-n", type=int, default=256)
    p.add_argument("--q1-rounds", type=int, default=2)
    p.add_argument("--q1-batch", type=int, default=32)
    p.add_argument("--q1-procs", type=int, default=1)
    p.add_argument("--q1-loops", type=int, default=2)
    p.add_argument("--q2-n", type=int, default=30_000)
    p.add_argument("--q2-batch", type=int, default=200)
    p.add_argument("--q2-procs", type=int, default=2)
    p.add_argument("--q2-loops", type=int, default=2)
    p.add_argument("--q4-n", type=int, default=192)
    p.add_argument("--q4-rounds", type=int, default=2)
    p.add_argument("--q4-batch", type=int, default=8)
    p.add_argument("--q4-loops", type=int, default=4)
    args = p.parse_args()
    only = set(args.only.split(","))
    with EmbeddedRedis() as redis:
        print(f"# bench/queue_bench.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  cpus={os.cpu_count()}  "
              f"valkey at {redis.url}", flush=True)
        for name, fn in (("q3", lambda: q3(redis.url)), ("q2", lambda: q2(redis.url, args)),
                         ("q1", lambda: q1(redis.url, args)), ("q4", lambda: q4(redis.url, args)),
                         ("q5", lambda: q5(redis.url, args))):
            if name in only:
                fn()
                sys.stdout.flush()


if __name__ == "__main__":
    main()
