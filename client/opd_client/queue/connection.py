"""Connect to Redis, Valkey or a Redis Cluster from one URL (the cluster is detected).

Retries here cover only commands that are safe to repeat (reads, acks, the scorer's
idempotent publish). XADD from a producer is never retried by the client library: a reply
lost in a reconnect would otherwise add the rollouts twice.
This module holds no queue logic.
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from opd_client.errors import InvalidRequest, OPDError, PermissionDenied, Unauthenticated, Unavailable

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


def _mode(url: str) -> tuple[str, bool | None]:
    """Strip our own `cluster=yes|no` query option; None = detect with INFO cluster."""
    _check(url)
    p = urlsplit(url.replace("valkey://", "redis://", 1))
    q = [(k, v) for k, v in parse_qsl(p.query) if k != "cluster"]
    forced = dict(parse_qsl(p.query)).get("cluster")
    if forced is not None and forced not in ("yes", "no"):
        raise InvalidRequest("redis_url", f"cluster={forced!r}: use cluster=yes or cluster=no (or leave it out)")
    return urlunsplit(p._replace(query=urlencode(q))), None if forced is None else forced == "yes"


def _is_cluster(info: dict) -> bool:
    return bool(int(info.get("cluster_enabled", 0)))


def connect(url: str, *, retries: int = 5):
    """A redis-py client for `url`: `RedisCluster` if the server runs in cluster mode (asked
    with INFO; a user without INFO rights adds `?cluster=yes` or `?cluster=no`)."""
    url, cluster = _mode(url)
    if cluster is None and not url.startswith("unix://"):
        probe = redis.Redis.from_url(url, **_kw(retries, False))
        try:
            cluster = _is_cluster(probe.info("cluster"))
        except NoPermissionError:
            cluster = False
        finally:
            probe.close()
    if cluster:
        return redis.RedisCluster.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=5.0)
    return redis.Redis.from_url(url, **_kw(retries, False))


async def aconnect(url: str, *, retries: int = 5):
    """The asyncio twin of `connect`."""
    url, cluster = _mode(url)
    if cluster is None and not url.startswith("unix://"):
        probe = aredis.Redis.from_url(url, **_kw(retries, True))
        try:
            cluster = _is_cluster(await probe.info("cluster"))
        except NoPermissionError:
            cluster = False
        finally:
            await probe.aclose()
    if cluster:
        return aredis.RedisCluster.from_url(url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=5.0)
    return aredis.Redis.from_url(url, **_kw(retries, True))


def as_opd_error(url: str, e: RedisError, what: str) -> OPDError:
    """One mapping of redis-py errors to OPD errors, for the producer and the consumer."""
    where = url.split("@")[-1]                        # never echo a password
    if isinstance(e, NoPermissionError):
        return PermissionDenied(f"{what}: the Redis user of {where} may not do this ({e}); an experiment's "
                                "user reaches only its own opd:{EXP}:* keys")
    if isinstance(e, AuthenticationError):
        return Unauthenticated(f"{what}: Redis at {where} refused the credentials in the URL ({e})")
    return Unavailable(f"{what}: Redis at {where}: {e}. Check OPD_REDIS_URL and that Redis is up; "
                       "retry when it is back")
