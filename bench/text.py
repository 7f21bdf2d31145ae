"""Text bench (G2): the native route fed text against the same route fed the same token ids, one run.

    .venv/bin/python bench/text.py               # ~3 min on a quiet 2-core CPU machine

Work: a Qwen3-architecture model with Qwen3's real tokenizer (151,936-row vocabulary; body hidden 256,
4 layers, random weights, float32), torch engine, `opd serve` as its own process. C concurrent
clients (default 32), each sending R requests (default 1) of P sequences (default 2) of ~L tokens
of text (default 512: English-like words), scored from the middle. Routes, plain httpx + orjson:
  - ids   POST /v1/score {"sequences": [{"token_ids", "score_from"}]}: the ids the tokenizer gives
  - text  POST /v1/score {"sequences": [{"text", "score_from_char"}]}: the same sequences as text;
          the teacher tokenizes (off the event loop) and answers with ids and offsets too
Both are measured in turn (the order alternating), `--passes` times; G2 is the median over passes of
text / ids tokens scored per second within a pass (target >= 0.9). Prints each pass, the figure and
a json line.
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

from opd_services.modeling.checkpoints import FamilyShape, cached_family
from opd_services.teacher.process import TeacherProcess
from verdict import verdict    # bench/verdict.py (a script's own folder is first on sys.path)


CACHE = Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache/opd"))
BENCH_QWEN3 = FamilyShape(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=32, intermediate_size=688, max_position_embeddings=4096)
WORDS = ("the model scores each token of the student's own sample and the trainer turns that into a "
         "per-token signal; reverse KL on its trajectories fixes exposure bias. Numbers 3.14 and 2,718, "
         "café, naïve, résumé — 東京 and 😀 appear too. Then we compute, verify, and distil again").split()


def texts(tok, n: int, length: int, rng) -> list[tuple[str, int]]:
    """n texts of ~length tokens, each with a boundary (a token start near the middle)."""
    out = []
    for _ in range(n):
        words = []
        while len(tok(" ".join(words))["input_ids"]) < length:
            words += list(rng.choice(WORDS, 32))
        text = " ".join(words)
        enc = tok(text, return_offsets_mapping=True)
        ids, offs = enc["input_ids"][:length], enc["offset_mapping"][:length]
        text = text[:offs[-1][1]]
        out.append((text, offs[len(ids) // 2][0]))
    return out


def bodies(route: str, seqs: list[tuple[str, int]], ids: list[tuple[list[int], int]]) -> dict:
    if route == "text":
        return {"sequences": [{"text": t, "score_from_char": b} for t, b in seqs]}
    return {"sequences": [{"token_ids": i, "score_from": s} for i, s in ids]}


async def drive(url: str, route: str, work: list, rounds: int) -> float:
    """Every client sends its request `rounds` times in a row; tokens scored per second."""
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=256)) as client:
        scored = [0]

        async def post(seqs, ids):
            r = await client.post("/v1/score", content=orjson.dumps(bodies(route, seqs, ids)),
                                  headers={"content-type": "application/json"})
            r.raise_for_status()
            scored[0] += orjson.loads(r.content)["usage"]["scored_tokens"]

        await post(*work[0])                                             # warm up
        scored[0] = 0
        t0 = time.perf_counter()

        async def one(seqs, ids):
            for _ in range(rounds):
                await post(seqs, ids)
        await asyncio.gather(*(one(*w) for w in work))
        return scored[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-request", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1, help="requests per client per measurement")
    ap.add_argument("--passes", type=int, default=5, help="rounds over both routes; G2 is the median over them")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    model = cached_family(CACHE, "qwen3", BENCH_QWEN3)
    tok = AutoTokenizer.from_pretrained(model)
    rng = np.random.default_rng(0)
    work = []
    for _ in range(args.clients):
        seqs = texts(tok, args.per_request, args.length, rng)
        ids = []
        for text, b in seqs:
            enc = tok(text, return_offsets_mapping=True)
            ids.append((enc["input_ids"], sum(1 for _, e in enc["offset_mapping"] if e <= b)))
        work.append((seqs, ids))
    print(f"bench model: {model}\nwork: {args.clients} clients x {args.rounds} requests x {args.per_request} x "
          f"~{args.length} tokens of text; load average {os.getloadavg()[0]:.1f}", flush=True)
    fig: dict = {"ids": [], "text": []}
    with TeacherProcess(OPD_MODEL=str(model), OPD_ENGINE="torch", OPD_DEVICE="cpu", OPD_DTYPE="float32",
                        OPD_AUTH="off") as t:
        for attempt in range(args.passes):
            for route in (("ids", "text") if attempt % 2 == 0 else ("text", "ids")):
                rate = asyncio.run(drive(t.http_url, route, work, args.rounds))
                fig[route].append(rate)
                print(f"  pass {attempt + 1} {route:<4} {rate:8,.0f} tok/s", flush=True)
    g2 = float(np.median([a / b for a, b in zip(fig["text"], fig["ids"])]))
    print(f"G2 text route / id route ({args.clients} clients, median of {args.passes} passes)  {g2:6.3f}  "
          f"{verdict(g2, 0.9)}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("json:", json.dumps(fig))


if __name__ == "__main__":
    main()
