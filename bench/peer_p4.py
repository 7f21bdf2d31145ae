"""P4 (issue 12): prefix-shared scoring against `vllm serve`, side by side in one run.

    .venv/bin/python bench/peer.py --p4 [--models body,bench] [--groups 1.0]

Work: groups of G completions of one prompt; we score the completions (score_from = prompt
length), the peer returns prompt_logprobs over the whole sequence, as trainers use it. Each
group is sent as one request, and again as one sequence per request from 16 concurrent clients;
k = 0 and k = 5. Tokens/s counts every position of every sequence, for both systems (as in P1).
  P4a prompt 512, completion 128, G=8 (target: ours >= 3x vllm serve, body-heavy model)
  P4b prompt 256, completion 256, G=4 (target >= 1.5x)
  P4c prompt 128, completion 1024, G=4 (report; ours must not be slower than ours unshared)
Systems: `vllm serve`, then `vllm serve --enable-prefix-caching`, each alone; then our `opd serve`
(torch engine, gRPC; prefix sharing and the prefix cache on: the defaults) and the same with
OPD_PREFIX_SHARING=false OPD_PREFIX_CACHE_MB=0 (unshared), both up, measured in turn for 3
rounds (order rotating; the median is reported), so shared / unshared compares like with like. Models: BODY_HEAVY (hidden 512,
8 layers, 8k vocabulary: LM head ~14% of FLOPs, like a 7B+ teacher) and BENCH_MODEL (32k
vocabulary, LM head 65%). Every measurement uses prompts of its own (no cache hit from an
earlier measurement). The shapes are fixed; --groups scales how many groups are sent.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import orjson

from opd_client import AsyncTeacherClient, Sequence
from opd_services.modeling.checkpoints import BENCH_MODEL, LlamaShape, cached_random_llama

from verdict import verdict        # bench/verdict.py
from vllm_peer import VllmServe   # bench/vllm_peer.py (this folder is first on sys.path)

BODY_HEAVY = LlamaShape(8192, 512, 8, 8, 8, 1376, 4096)
CLIENTS = 16
KS = (0, 5)
# name: (prompt, completion, G, groups sent per measurement at --groups 1)
WORKLOADS = {"P4a": (512, 128, 8, 2), "P4b": (256, 256, 4, 4), "P4c": (128, 1024, 4, 2)}
TARGETS = {"P4a": 3.0, "P4b": 1.5}


def head_share(shape: LlamaShape) -> float:
    """LM head share of per-token matmul FLOPs (attention scores left out)."""
    kv = shape.hidden_size * shape.num_key_value_heads // shape.num_attention_heads
    layer = 2 * shape.hidden_size ** 2 + 2 * shape.hidden_size * kv + 3 * shape.hidden_size * shape.intermediate_size
    head = shape.hidden_size * shape.vocab_size
    return head / (head + shape.num_hidden_layers * layer)


def groups(seed: int, vocab: int, prompt: int, completion: int, g: int, n: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(0, vocab, prompt)
        out.append([np.concatenate([p, rng.integers(0, vocab, completion)]).tolist() for _ in range(g)])
    return out


def peer_call(url: str, model: str, k: int):
    client = httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=CLIENTS))

    async def call(seqs: list[list[int]]) -> int:
        body = orjson.dumps({"model": model, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": k})
        r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        r.raise_for_status()
        assert all(len(c["prompt_logprobs"]) == len(s) for c, s in zip(orjson.loads(r.content)["choices"], seqs))
        return sum(len(s) for s in seqs)
    return call, client.aclose


def ours_call(url: str, prompt: int, k: int):
    clients = [AsyncTeacherClient(url) for _ in range(CLIENTS)]
    turn = iter(range(10 ** 9))

    async def call(seqs: list[list[int]]) -> int:
        out = await clients[next(turn) % CLIENTS].score([Sequence(token_ids=s, score_from=prompt) for s in seqs],
                                                       top_k=k)
        assert out.usage.scored_tokens == sum(len(s) - prompt for s in seqs)
        return out.usage.total_tokens

    async def close():
        await asyncio.gather(*(c.close() for c in clients))
    return call, close


async def drive(factory, units: list[list[list[int]]], warm: list[list[int]]) -> float:
    """CLIENTS workers take units (a request's sequences) in order; every position per second."""
    call, close = factory()
    try:
        await call(warm)
        todo = asyncio.Queue()
        for u in units:
            todo.put_nowait(u)

        async def worker():
            n = 0
            while not todo.empty():
                n += await call(todo.get_nowait())
            return n
        t0 = time.perf_counter()
        n = sum(await asyncio.gather(*(worker() for _ in range(CLIENTS))))
        return n / (time.perf_counter() - t0)
    finally:
        await close()


def measure(systems: dict, vocab: int, scale: float, fig: dict, tag: str, rounds: int = 1) -> None:
    """systems: name -> factory_for(prompt, k) -> a call factory. Fresh prompts per measurement
    (seeded by its name and round); with several systems, each round runs them in turn, the order
    rotating, and the figure is the median over rounds (two systems measured minutes apart on a
    2-core VM differed by 10-20% on the same work)."""
    names = list(systems)
    for wl, (prompt, completion, g, n) in WORKLOADS.items():
        for k in KS:
            for mode in ("group", "seq"):
                rates: dict[str, list[float]] = {name: [] for name in names}
                for r in range(rounds):
                    seed = abs(hash((tag, wl, k, mode, r))) % 2**32        # same work for every system in this run
                    gs = groups(seed, vocab, prompt, completion, g, max(1, round(n * scale)))
                    units = gs if mode == "group" else [[s] for grp in gs for s in grp]
                    warm = groups(seed + 1, vocab, prompt, completion, 1, 1)[0]
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        rates[name].append(asyncio.run(drive(lambda: systems[name](prompt, k), units, warm)))
                for name in names:
                    key = f"{tag}/{wl}/k{k}/{mode}/{name}"
                    fig[key] = rate = float(np.median(rates[name]))
                    print(f"  {key:<40} {rate:9,.0f} tok/s  (rounds: {', '.join(f'{x:,.0f}' for x in rates[name])})",
                          flush=True)


def run_model(shape: LlamaShape, tag: str, cache, scale: float, fig: dict, peer, rounds: int) -> None:
    from pathlib import Path
    model = str(cached_random_llama(cache, shape, prefix="bench"))
    name = Path(model).name
    print(f"{tag}: {model} (LM head {head_share(shape):.0%} of FLOPs)", flush=True)
    for system, extra in (("vllm-serve", []), ("vllm-serve-pc", ["--enable-prefix-caching"])):
        with VllmServe(model, peer.free_port(), served_name=name, extra=extra,
                       log_path=peer.LOGS / f"p4-{system}.log") as srv:
            measure({system: lambda p, k: peer_call(srv.url, name, k)}, shape.vocab_size, scale, fig, tag)
    # ours with and without sharing, both up, measured in turn, so that their ratio is like for like
    shared, unshared = peer.OpdServe(model, "torch", "shared"), peer.OpdServe(model, "torch", "unshared")
    unshared.env.update({"OPD_PREFIX_SHARING": "false", "OPD_PREFIX_CACHE_MB": "0"})
    with shared, unshared:
        measure({"ours": lambda p, k: ours_call(f"grpc://127.0.0.1:{shared.grpc}", p, k),
                 "ours-unshared": lambda p, k: ours_call(f"grpc://127.0.0.1:{unshared.grpc}", p, k)},
                shape.vocab_size, scale, fig, tag, rounds)


def report(fig: dict, tags: list[str]) -> list[str]:
    lines = []
    for tag in tags:
        for wl in WORKLOADS:
            for k in KS:
                for mode in ("group", "seq"):
                    base = f"{tag}/{wl}/k{k}/{mode}"
                    peer = max(fig[f"{base}/vllm-serve"], fig[f"{base}/vllm-serve-pc"])
                    ours, unshared = fig[f"{base}/ours"], fig[f"{base}/ours-unshared"]
                    target = TARGETS.get(wl) if tag == "body" else None
                    held = "" if target is None else f"  {verdict(ours / peer, target)}"
                    lines.append(f"{base:<28} ours {ours:8,.0f} | unshared {unshared:8,.0f} | vllm serve best "
                                 f"{peer:8,.0f} | ours/peer {ours / peer:5.2f}{held} | shared/unshared "
                                 f"{ours / unshared:5.2f}")
    return lines


def main(peer, models: list[str], scale: float, cache, rounds: int = 3) -> dict:
    fig: dict = {}
    shapes = {"body": BODY_HEAVY, "bench": BENCH_MODEL}
    for tag in models:
        run_model(shapes[tag], tag, cache, scale, fig, peer, rounds)
    print("\n".join(report(fig, models)))
    return fig
