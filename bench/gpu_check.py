"""GPU check of the vLLM engine against the torch engine (driven by bench/gpu_check.sh).

Same work on both: N sequences of 1,024 tokens, positions [768, 1024) scored, top-k 0 and 20,
bfloat16 weights; the engines run one after the other (each gets the GPU to itself). Prints
tokens scored/s per engine and k, vLLM / torch, and agreement (max and mean |logprob difference|,
top-1 id agreement). For k=0 it also times vLLM's span-only scoring against full prompt logprobs
where the V2 model runner offers it. Does not download anything.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from opd_services.modeling.checkpoints import LlamaShape, cached_random_llama
from opd_services.teacher.engines.base import ScoreItem

# Qwen2.5-0.5B's shape (untied head here: ~0.63B parameters)
QWEN_05B = LlamaShape(151_936, 896, 24, 14, 2, 4864, 4096)
LENGTH, SPAN, KS = 1024, 256, (0, 20)


def items(n: int, k: int, seed: int = 0) -> list[ScoreItem]:
    rng = np.random.default_rng(seed)
    return [ScoreItem(rng.integers(0, QWEN_05B.vocab_size, LENGTH), LENGTH - SPAN, top_k=k) for _ in range(n)]


def grouped(n: int, k: int, prompt: int = 760, g: int = 8, seed: int = 1) -> list[ScoreItem]:
    """n // g groups of g completions of one prompt (760 tokens: not a multiple of vLLM's block
    size, so a cached prompt stops before the first scored row), 1,024 tokens each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(max(1, n // g)):
        p = rng.integers(0, QWEN_05B.vocab_size, prompt)
        out += [ScoreItem(np.concatenate([p, rng.integers(0, QWEN_05B.vocab_size, LENGTH - prompt)]), prompt, top_k=k)
                for _ in range(g)]
    return out


def prefix_check(eng, fig: dict, n: int, reps: int) -> None:
    """Issue 12: grouped work on the vLLM engine without and with OPD_VLLM_PREFIX_CACHE (the flag's
    GPU path: the V2 span runner with prompt_logprob_start); the numbers must agree."""
    work = grouped(n, 0)
    eng.prefix_cache = False
    fig["vllm/groups/k0"], plain = rate(eng, work, len(work), reps)
    eng.prefix_cache = True
    fig["vllm/groups/k0-prefix-cache"], cached = rate(eng, work, len(work), reps)
    eng.prefix_cache = False
    d = max(float(np.abs(a.logprobs_T - b.logprobs_T).max()) for a, b in zip(plain, cached))
    print(f"groups of 8 (prompt 760): vLLM {fig['vllm/groups/k0']:,.0f} tok/s | with prefix cache "
          f"{fig['vllm/groups/k0-prefix-cache']:,.0f} | |dlogprob| max {d:.2e} (must be ~0)")


def rate(engine, work, batch: int, reps: int) -> tuple[float, list]:
    engine.score(work[:batch])                                   # warm up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, out = time.perf_counter(), []
    for _ in range(reps):
        out = [r for i in range(0, len(work), batch) for r in engine.score(work[i:i + batch])]
    return reps * sum(it.n_scored for it in work) / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", default=os.environ.get("OPD_CACHE_DIR", str(Path.home() / ".cache/opd")))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = str(cached_random_llama(args.cache, QWEN_05B, prefix="gpu-check"))
    print(f"model {model} ready in {time.perf_counter() - t0:.0f}s")
    fig, res = {}, {}
    from opd_services.teacher.engines.torch_engine import TorchEngine
    eng = TorchEngine(model, device="cuda", dtype="bfloat16", max_top_k=20)
    for k in KS:
        fig[f"torch/k{k}"], res[f"torch/k{k}"] = rate(eng, items(args.n, k), 16, args.reps)
    fig["torch/groups/k0"], _ = rate(eng, grouped(args.n, 0), 16, args.reps)       # prefix-shared (issue 12)
    eng.close()
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    from opd_services.teacher.engines.vllm_engine import VllmEngine
    eng = VllmEngine(model, dtype="bfloat16", max_top_k=20, engine_args={"gpu_memory_utilization": 0.8,
                                                                         "enable_prefix_caching": True})
    print(f"vllm engine: span-only scoring {'on' if eng.span else 'off'} (V2 model runner)")
    try:
        for k in KS:
            fig[f"vllm/k{k}"], res[f"vllm/k{k}"] = rate(eng, items(args.n, k), args.n, args.reps)
        if eng.span:
            eng.span = False
            fig["vllm/k0-prompt-logprobs"], _ = rate(eng, items(args.n, 0), args.n, args.reps)
            eng.span = True
        prefix_check(eng, fig, args.n, args.reps)
    finally:
        eng.close()
    for k in KS:
        a, b = res[f"vllm/k{k}"], res[f"torch/k{k}"]
        d = np.concatenate([np.abs(x.logprobs_T - y.logprobs_T) for x, y in zip(a, b)])
        line = (f"k={k:<2} tokens scored/s: vLLM {fig[f'vllm/k{k}']:,.0f} | torch {fig[f'torch/k{k}']:,.0f} | "
                f"vLLM/torch {fig[f'vllm/k{k}'] / fig[f'torch/k{k}']:.2f} | |dlogprob| max {d.max():.4f} mean {d.mean():.4f}")
        if k:
            top1 = np.mean(np.concatenate([x.top_ids_T_K[:, 0] == y.top_ids_T_K[:, 0] for x, y in zip(a, b)]))
            line += f" | top-1 agreement {top1:.3f}"
        print(line)
    if "vllm/k0-prompt-logprobs" in fig:
        print(f"k=0 span-only {fig['vllm/k0']:,.0f} tok/s vs full prompt logprobs {fig['vllm/k0-prompt-logprobs']:,.0f}")
    print("json:", json.dumps(fig))


if __name__ == "__main__":
    main()
