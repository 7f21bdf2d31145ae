"""Scoring service benchmark (issue 2): R1-R5 side by side, in one run.

    .venv/bin/python bench/scoring.py            # ~3-5 min on a 2-core CPU machine

Model: BENCH_MODEL (Llama-style, hidden 256, 4 layers, 32k vocabulary, random weights,
built by our code). The teacher runs as its own process (`opd serve`), as users run it;
in-process figures call TorchEngine.score directly in this process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from opd_client import AsyncTeacherClient, Sequence
from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.torch_engine import TorchEngine
from opd_services.teacher.process import TeacherProcess
from verdict import verdict    # bench/verdict.py (a script's own folder is first on sys.path)


CACHE = Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache/opd"))
BUDGET = 16_384   # the service's default max_batch_tokens, used in-process too


def work(n_seq: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, BENCH_MODEL.vocab_size, length).astype(np.int64) for _ in range(n_seq)]


def inprocess_rate(engine: TorchEngine, seqs: list[np.ndarray], score_from: int = 1, budget: int = BUDGET,
                   reps: int = 1) -> float:
    """Tokens scored per second, engine.score called directly on batches of `budget` tokens."""
    items = [ScoreItem(s, score_from) for s in seqs]
    per = max(1, budget // len(seqs[0]))
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(0, len(items), per):
            engine.score(items[i:i + per])
    return reps * sum(it.n_scored for it in items) / (time.perf_counter() - t0)


async def service_rate(url: str, requests: list[list[np.ndarray]], rounds: int) -> float:
    clients = [AsyncTeacherClient(url) for _ in requests]

    async def one(c, req):
        n = 0
        for _ in range(rounds):
            out = await c.score([Sequence(token_ids=s) for s in req])
            n += out.usage.scored_tokens
        return n

    try:
        await asyncio.gather(*(c.score([Sequence(token_ids=r[0][:8])]) for c, r in zip(clients, requests)))  # connect
        t0 = time.perf_counter()
        n = sum(await asyncio.gather(*(one(c, r) for c, r in zip(clients, requests))))
        return n / (time.perf_counter() - t0)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def engine_flops_per_token(engine: TorchEngine, length: int) -> float:
    """2 x params touched per token (decoder + LM head) + causal attention (QK^T and AV)."""
    cfg = engine.model.config
    body = sum(p.numel() for n, p in engine.model.named_parameters() if "embed_tokens" not in n)
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * (length / 2)
    return 2 * body + attn


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_child(model_dir: str) -> None:
    """Run in a fresh process: peak RSS added by scoring 8 x 2048 tokens (all positions),
    sampled every millisecond by a thread (ru_maxrss would be the model load's peak)."""
    engine = TorchEngine(model_dir, device="cpu", dtype="float32")
    engine.score([ScoreItem(s, 1) for s in work(2, 64, 9)])             # warm up allocator paths
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    engine.score([ScoreItem(s, 1) for s in work(8, 2048, 10)])
    done.set()
    th.join()
    print(json.dumps({"added_mb": peak[0] - before}))


def ratio_line(name: str, value: float, target: float, op: str = ">=") -> str:
    return f"{name:<58} {value:8.3f}  {verdict(value, target, op)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="requests per client in R1")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return peak_rss_child(args.rss_child)

    model = str(cached_random_llama(CACHE, BENCH_MODEL, prefix="bench"))
    print(f"bench model: {model}  torch threads: {torch.get_num_threads()}")
    engine = TorchEngine(model, device="cpu", dtype="float32")
    r1_reqs = [work(8, 256, seed) for seed in range(16)]
    r1_flat = [s for r in r1_reqs for s in r]
    inprocess_rate(engine, r1_flat[:16])                                   # warm-up
    r2_seqs = work(32, 32, 99)
    lines, figures = [], {}

    # R1: service overhead
    ip = inprocess_rate(engine, r1_flat, reps=args.rounds)
    with TeacherProcess(OPD_MODEL=model) as t:
        g = asyncio.run(service_rate(t.grpc_url, r1_reqs, args.rounds))
        h = asyncio.run(service_rate(t.http_url, r1_reqs, args.rounds))
        # R2: 32 clients x one 32-token sequence, batched by the service
        r2_service = asyncio.run(service_rate(t.grpc_url, [[s] for s in r2_seqs], 20))
    r2_inproc = inprocess_rate(engine, r2_seqs, budget=32 * 32, reps=60)
    with TeacherProcess(OPD_MODEL=model, OPD_BATCHING="false") as t:
        r2_nobatch = asyncio.run(service_rate(t.grpc_url, [[s] for s in r2_seqs], 20))
    figures.update(inprocess_tok_s=ip, grpc_tok_s=g, http_tok_s=h, r2_service=r2_service,
                   r2_inproc_one_batch=r2_inproc, r2_service_no_batching=r2_nobatch)
    lines.append(f"R1 in-process engine {ip:,.0f} tok/s | gRPC {g:,.0f} | HTTP {h:,.0f}  (16 clients x 8 x 256)")
    lines.append(ratio_line("R1 gRPC / in-process", g / ip, 0.85))
    lines.append(ratio_line("R1 HTTP / in-process", h / ip, 0.7))
    lines.append(f"R2 service {r2_service:,.0f} tok/s | in-process one batch {r2_inproc:,.0f} | "
                 f"service, batching off {r2_nobatch:,.0f}  (32 clients x 1 x 32)")
    lines.append(ratio_line("R2 service / in-process one batch", r2_service / r2_inproc, 0.8))
    lines.append(f"{'R2 service / service with batching off':<58} {r2_service / r2_nobatch:8.3f}  (report)")

    # R3: span-only LM head
    seqs = work(4, 1024, 5)
    t_full = 1 / inprocess_rate(engine, seqs, 1) * len(seqs) * 1023
    t_span = 1 / inprocess_rate(engine, seqs, 960) * len(seqs) * 64
    figures.update(r3_full_s=t_full, r3_span_s=t_span)
    lines.append(f"R3 4 x 1024 tokens: all positions {t_full:.3f}s, last 64 only {t_span:.3f}s")
    lines.append(ratio_line("R3 span-only / all positions (time)", t_span / t_full, 0.6, "<="))

    # R4: memory, in a fresh process
    out = subprocess.run([sys.executable, __file__, "--rss-child", model], capture_output=True, text=True, check=True)
    added = json.loads(out.stdout.strip().splitlines()[-1])["added_mb"]
    figures["r4_added_mb"] = added
    lines.append(f"R4 8 x 2048 tokens: peak RSS added {added:,.0f} MB (full fp32 logits would be "
                 f"{8 * 2048 * BENCH_MODEL.vocab_size * 4 / 2**20:,.0f} MB)")
    lines.append(ratio_line("R4 peak RSS added (GB)", added / 1024, 1.0, "<="))

    # R5: engine FLOP rate vs torch fp32 matmul on this machine
    peak = matmul_rate()
    eng_rate = ip * engine_flops_per_token(engine, 256)
    figures.update(matmul_gflops=peak / 1e9, engine_gflops=eng_rate / 1e9)
    lines.append(f"R5 engine {eng_rate / 1e9:,.1f} GFLOP/s vs fp32 matmul {peak / 1e9:,.1f} GFLOP/s")
    lines.append(ratio_line("R5 engine / matmul FLOP rate", eng_rate / peak, 0.4))

    print("\n".join(lines))
    print("json:", json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
