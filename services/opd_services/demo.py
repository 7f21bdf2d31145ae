"""`opd demo` (interim, until the distillation demo lands): start the teacher on embedded
defaults, score one sample through HTTP and through gRPC with the Python client, print
both, check they agree, stop."""
from __future__ import annotations

import time

import numpy as np

from opd_client import Sequence, TeacherClient
from opd_services.config import Settings


def run_demo(settings: Settings) -> int:
    from opd_services.teacher.server import BackgroundTeacher

    settings = settings.model_copy(update={"http_port": 0, "grpc_port": 0})
    t0 = time.perf_counter()
    print("starting the teacher (embedded default model; built on first use)...", flush=True)
    with BackgroundTeacher(settings) as teacher:
        print(f"ready in {time.perf_counter() - t0:.1f}s: {teacher.http_url}  {teacher.grpc_url}")
        sample = Sequence(id="sample-1", token_ids=[1, 17, 42, 99, 7, 256, 3, 11], score_from=4)
        outs = {}
        for url in (teacher.http_url, teacher.grpc_url):
            with TeacherClient(url) as client:
                outs[url.split(":")[0]] = client.score([sample], top_k=3)
        m = outs["http"].model
        print(f"model: {m.name} engine={m.engine} {m.engine_version} dtype={m.dtype} revision={m.revision[:23]}...")
        r = outs["grpc"].results[0]
        print(f"{'pos':>4} {'token':>6} {'logprob':>10}   top-3 (id: logprob)")
        for t, lp in enumerate(r.logprobs_T):
            pos = sample.score_from + t
            tops = ", ".join(f"{i}: {v:.3f}" for i, v in zip(r.top_ids_T_K[t], r.top_logprobs_T_K[t]))
            print(f"{pos:>4} {sample.token_ids[pos]:>6} {lp:>10.4f}   {tops}")
        diff = float(np.max(np.abs(outs["http"].results[0].logprobs_T - r.logprobs_T)))
        print(f"HTTP vs gRPC max |diff| = {diff:.2e}")
    print("teacher stopped.")
    return 0 if diff == 0 else 1
