"""Connect to Redis, Valkey or a Redis Cluster from one URL (the cluster is detected).

Retries here cover only commands that are safe to repeat (reads, acks, the scorer's
idempotent publish). XADD from a producer is never retried by the client library: a reply
lost in a reconnect would otherwise add the rollouts twice.
This module holds no queue logic.
"""
from __future__ import annotations

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from opd_client.errors import InvalidRequest

RETRY_ON = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
SOCKET_TIMEOUT_S = 30.0     # above the longest BLOCK we issue (10 s)


def _kw(retries: int, asyncio: bool) -> dict:
    from redis.asyncio.retry import Retry as ARetry
    from redis.retry import Retry
    cls = ARetry if asyncio else Retry
    return dict(retry=cls(ExponentialBackoff(cap=1.0, base=0.05), retries), retry_on_error=RETRY_ON,
                socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=5.0)


def _check(url: str) -> None:
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://", "valkey://")):
        raise InvalidRequest("redis_url", f"{url!r}: expected redis://HOST:PORT[/DB], rediss://... or "
                                          "unix:///path/to.sock (OPD_REDIS_URL)")


def connect(url: str, *, retries: int = 5):
    """A redis-py client for `url`: `RedisCluster` if the server runs in cluster mode."""
    _check(url)
    url = url.replace("valkey://", "redis://", 1)
    r = redis.Redis.from_url(url, **_kw(retries, False))
    if url.startswith("unix://") or not int(r.info("cluster").get("cluster_enabled", 0)):
        return r
    r.close()
    return redis.RedisCluster.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=5.0)


async def aconnect(url: str, *, retries: int = 5):
    """The asyncio twin of `connect`."""
    _check(url)
    url = url.replace("valkey://", "redis://", 1)
    r = aredis.Redis.from_url(url, **_kw(retries, True))
    if url.startswith("unix://") or not int((await r.info("cluster")).get("cluster_enabled", 0)):
        return r
    await r.aclose()
    return aredis.RedisCluster.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=5.0)
