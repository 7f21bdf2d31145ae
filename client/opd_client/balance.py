"""Client-side balancing over a teacher's replicas: round robin, per request, skipping the
ones that just failed.

A replica that fails in a way that says "not there / not ready" (the client's retry policy
decides which) is taken out for `eject_s`, doubling on each further failure up to
`max_eject_s`; after that it gets real requests again, and one success puts it fully back.
When every replica is out, the one due back soonest is tried anyway (never "no replica").
Thread-safe (the sync client is shared by threads). This module opens no connection and
never retries by itself: the client's `_call` does, through `pick(tried)`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(eq=False)
class Replica:
    address: str
    conn: Any                       # what the transport talks through (httpx client, gRPC stub)
    failures: int = 0               # consecutive
    out_until: float = 0.0          # monotonic time it comes back into rotation
    requests: int = 0               # picked this many times (for tests and debugging)


class Pool:
    def __init__(self, addresses: list[str], connect: Callable[[str], Any], *,
                 eject_s: float = 0.5, max_eject_s: float = 10.0):
        self._connect = connect
        self.eject_s, self.max_eject_s = eject_s, max_eject_s
        self.replicas = [Replica(a, connect(a)) for a in addresses]
        self._next = 0
        self._lock = threading.Lock()

    def pick(self, tried: set[Replica] = frozenset()) -> Replica:
        """The next replica in rotation that is in and not in `tried`; else the one due back soonest."""
        with self._lock:
            now = time.monotonic()
            fresh = [r for r in self.replicas if r not in tried] or self.replicas
            live = [r for r in fresh if r.out_until <= now]
            if live:
                r = live[self._next % len(live)]
                self._next += 1
            else:
                r = min(fresh, key=lambda x: x.out_until)
            r.requests += 1
            return r

    def has_untried(self, tried: set[Replica]) -> bool:
        now = time.monotonic()
        return any(r not in tried and r.out_until <= now for r in self.replicas)

    def failed(self, r: Replica) -> None:
        with self._lock:
            r.failures += 1
            r.out_until = time.monotonic() + min(self.max_eject_s, self.eject_s * 2 ** (r.failures - 1))

    def succeeded(self, r: Replica) -> None:
        if r.failures:
            with self._lock:
                r.failures, r.out_until = 0, 0.0

    def replace(self, addresses: list[str]) -> list[Replica]:
        """Re-resolved addresses: keep the replicas still named, add new ones; returns the dropped."""
        with self._lock:
            keep = {r.address: r for r in self.replicas}
            self.replicas = [keep.pop(a, None) or Replica(a, self._connect(a)) for a in addresses]
            return list(keep.values())
