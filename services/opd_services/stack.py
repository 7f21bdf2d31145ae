"""A whole OPD deployment on one machine, every role its own process: embedded Valkey, the
teacher (`opd serve`), a scorer (`opd scorer`), and trainers (`opd train`) run on demand.

Used by `opd demo`, bench/distill.py and the end-to-end test. Shutdown, spelled out:
  1) SIGTERM the scorer, then the teacher (each drains its in-flight work);
  2) wait up to `grace_s` for each; SIGKILL what is still there;
  3) stop Valkey.
Each child's stdout/stderr goes to a log file in `log_dir`, named after its role; the
error raised when a child dies early includes that log's tail. This module trains nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from opd_services.redis_embed import EmbeddedRedis, free_port


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in the calling (main) process, so a LocalStack's `with` block
    stops its children instead of orphaning them."""
    def handler(sig, frame):
        raise SystemExit(128 + sig)
    signal.signal(signal.SIGTERM, handler)


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    return env


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class LocalStack:
    def __init__(self, teacher_model: Path, log_dir: Path, *, max_top_k: int = 32, threads: int = 1,
                 grace_s: float = 15.0):
        self.teacher_model = Path(teacher_model)
        self.log_dir = Path(log_dir)
        self.max_top_k = max_top_k
        self.threads = threads
        self.grace_s = grace_s
        self.redis: EmbeddedRedis | None = None
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.http_port = self.grpc_port = 0

    @property
    def teacher_grpc(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def teacher_http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def _spawn(self, role: str, args: list[str], console: bool = False) -> subprocess.Popen:
        """Start `opd ARGS`; output to `log_dir/ROLE.log`, or stderr to this console (progress bars)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{role}.log"
        env = _env(self.threads)
        if console:
            env["OPD_LOG_LEVEL"] = "warning"
        with log.open("wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "opd_services.cli", *args], stdout=f,
                                    stderr=None if console else subprocess.STDOUT, env=env)
        self.procs[role] = (proc, log)
        return proc

    def _check_alive(self, role: str) -> None:
        proc, log = self.procs[role]
        if proc.poll() is not None:
            raise RuntimeError(f"the {role} process exited with code {proc.returncode}; its log "
                               f"({log}) ends with:\n{_tail(log)}")

    def start(self, timeout_s: float = 180.0) -> "LocalStack":
        # 1) Valkey  2) teacher, wait until ready  3) scorer
        self.redis = EmbeddedRedis().start()
        self.http_port, self.grpc_port = free_port(), free_port()
        self._spawn("teacher", ["serve", "--model", str(self.teacher_model), "--device", "cpu",
                                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                                "--max-top-k", str(self.max_top_k)])
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive("teacher")
            try:
                if httpx.get(f"{self.teacher_http}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the teacher was not ready within {timeout_s:.0f}s; see {self.procs['teacher'][1]}")
            time.sleep(0.2)
        self._spawn("scorer", ["scorer", "--teacher-url", self.teacher_grpc, "--redis-url", self.redis_url,
                               "--metrics-port", str(free_port())])
        time.sleep(0.5)
        self._check_alive("scorer")
        return self

    def train(self, role: str, args: list[str], timeout_s: float, console: bool = False) -> subprocess.CompletedProcess:
        """Run `opd train ARGS` as its own process (wired to this stack) and wait for it.
        console=True: its progress bar and warnings go to this process's stderr."""
        proc = self._spawn(role, ["train", "--teacher-url", self.teacher_grpc, "--redis-url", self.redis_url,
                                  "--metrics-port", str(free_port()), *args], console=console)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"`opd train` ({role}) ran past {timeout_s:.0f}s; log: {self.procs[role][1]}") from None
        if rc != 0:
            raise RuntimeError(f"`opd train` ({role}) exited with {rc}; its log ends with:\n{_tail(self.procs[role][1])}")
        return subprocess.CompletedProcess(proc.args, rc)

    def engine_seconds(self) -> dict[str, float]:
        """The teacher's own engine seconds so far, by kind (score, generate), summed over
        experiments: read from its /metrics (opd_teacher_engine_seconds_total)."""
        from prometheus_client.parser import text_string_to_metric_families
        out = {"score": 0.0, "generate": 0.0}
        text = httpx.get(f"{self.teacher_http}/metrics", timeout=10).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "opd_teacher_engine_seconds_total":
                    out[s.labels["kind"]] = out.get(s.labels["kind"], 0.0) + s.value
        return out

    def stop(self) -> None:
        for role in ("scorer", "teacher"):
            if role in self.procs and self.procs[role][0].poll() is None:
                self.procs[role][0].send_signal(signal.SIGTERM)
                try:
                    self.procs[role][0].wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    self.procs[role][0].kill()
                    self.procs[role][0].wait()
        for proc, _ in self.procs.values():   # trainers are waited for; anything left is killed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> "LocalStack":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
