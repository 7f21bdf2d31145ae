"""P4 engine work (issue 12): the torch engine with and without prefix sharing, in process, on the
P4 shapes, measured in CPU seconds of one thread (process_time), so a busy shared machine slows
both alike instead of handing each a different share of the cores.

    .venv/bin/python bench/prefix_cpu.py [--reps 2]

Prints tokens (every position) per CPU second, shared and unshared, and their ratio, per shape.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from opd_services.modeling.checkpoints import BENCH_MODEL, LlamaShape, cached_random_llama
from opd_services.teacher.engines.base import ScoreItem


BODY_HEAVY = LlamaShape(8192, 512, 8, 8, 8, 1376, 4096)
# name: (prompt, completion, G, groups in one batch)
SHAPES = {"P4a": (512, 128, 8, 2), "P4b": (256, 256, 4, 4), "P4c": (128, 1024, 4, 2)}


def work(shape: LlamaShape, prompt: int, completion: int, g: int, n: int, seed: int) -> list[ScoreItem]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(0, shape.vocab_size, prompt)
        out += [ScoreItem(np.concatenate([p, rng.integers(0, shape.vocab_size, completion)]), prompt) for _ in range(g)]
    return out


def main() -> None:
    import torch
    from opd_services.teacher.engines.torch_engine import TorchEngine
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--models", default="body,bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = os.environ.get("OPD_CACHE_DIR", os.path.expanduser("~/.cache/opd"))
    for tag in args.models.split(","):
        shape = {"body": BODY_HEAVY, "bench": BENCH_MODEL}[tag]
        path = cached_random_llama(cache, shape, prefix="bench")
        engines = {"shared": TorchEngine(path, device="cpu", prefix_cache_mb=0),
                   "unshared": TorchEngine(path, device="cpu", share_prefixes=False)}
        for name, (p, c, g, n) in SHAPES.items():
            rate = {}
            for sys_name, eng in engines.items():
                eng.score(work(shape, p, c, g, 1, 99))                                # warm up
                best = 0.0
                for r in range(args.reps):
                    w = work(shape, p, c, g, n, r)
                    t0 = time.process_time()
                    eng.score(w)
                    best = max(best, sum(it.n_tokens for it in w) / (time.process_time() - t0))
                rate[sys_name] = best
            print(f"{tag} {name} prompt {p} completion {c} G={g}: shared {rate['shared']:,.0f} | unshared "
                  f"{rate['unshared']:,.0f} tokens per CPU second -> {rate['shared'] / rate['unshared']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
