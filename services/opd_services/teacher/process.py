"""Run `opd serve` as its own process (as users do) and find its ports: for benches, the
demo and tests that need the teacher out of process. Configuration is passed as OPD_* env."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx


class TeacherProcess:
    """with TeacherProcess(OPD_MODEL=path) as t: ... t.http_url, t.grpc_url; stopped with SIGTERM."""

    def __init__(self, **env: str):
        self.env = {**os.environ, "OPD_HTTP_PORT": "0", "OPD_GRPC_PORT": "0", "OPD_LOG_LEVEL": "info", **env}

    def __enter__(self) -> "TeacherProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "opd_services.cli", "serve"], env=self.env,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"opd serve exited with {self.proc.returncode}")
            if "teacher listening" in line:
                http, grpc = line.split("teacher listening: ")[1].split()[:2]
                self.http_url, self.grpc_url = http, grpc
                break
        while httpx.get(f"{self.http_url}/readyz").status_code != 200:
            time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)
