"""Run `opd serve` as its own process (as users do) and find its ports: for benches, the
demo and tests that need the teacher out of process. Configuration is passed as OPD_* env."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from opd_client.tls import TLS


class TeacherProcess:
    """with TeacherProcess(OPD_MODEL=path) as t: ... t.http_url, t.grpc_url; stopped with SIGTERM.
    With OPD_TLS_CERT in env, pass `tls_ca` (the CA that signed it) to check readiness over https."""

    def __init__(self, tls_ca: str | None = None, **env: str):
        self.env = {**os.environ, "OPD_HTTP_PORT": "0", "OPD_GRPC_PORT": "0", "OPD_LOG_LEVEL": "info", **env}
        self.verify = TLS(ca=tls_ca).ssl_context() if tls_ca else True

    def __enter__(self) -> "TeacherProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "opd_services.cli", "serve"], env=self.env,
                                     stderr=subprocess.PIPE, text=True)
        try:
            self._wait_ready()
        except BaseException:      # never leave a teacher behind when start-up fails
            self.proc.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"opd serve exited with {self.proc.returncode}")
            if "teacher listening" in line:
                http, grpc = line.split("teacher listening: ")[1].split()[:2]
                self.http_url, self.grpc_url = http, grpc
                break
        while not self._ready():
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:   # the port is bound before uvicorn listens on it: refused for a moment
            return httpx.get(f"{self.http_url}/readyz", verify=self.verify).status_code == 200
        except httpx.ConnectError:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opd serve exited with {self.proc.returncode}") from None
            return False

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)
