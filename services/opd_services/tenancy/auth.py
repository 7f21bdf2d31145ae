"""Authentication of teacher requests: an `Authorization: Bearer KEY` value -> a Tenant.

Modes (OPD_AUTH): `on` requires a registered key on every scoring and model request;
`off` (explicit only, logged loudly) accounts everything to "default"; `auto` (the default)
is `on` as soon as one experiment exists in the registry and `off` until then. Each request
looks its key up in Redis, so a rotated or deleted key stops working on its next request.
Health, readiness and metrics routes are not authenticated (probes and Prometheus).
This module does not touch the surfaces; they pass the header value in.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections import defaultdict
from dataclasses import dataclass

from opd_services.errors import ConfigError, Unauthenticated
from opd_services.tenancy.registry import EXPERIMENTS, KEYS, USAGE_PREFIX, Experiment, sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    max_inflight_tokens: int | None = None
    admin: bool = False


DEFAULT = Tenant("default")
ADMIN = Tenant("admin", admin=True)


def bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization header must be `Bearer <experiment key>`")
    return token.strip()


class Authenticator:
    def __init__(self, mode: str, admin_key: str | None, redis=None):
        if mode == "on" and redis is None:
            raise ConfigError("OPD_AUTH='on': needs the experiments registry; set OPD_REDIS_URL")
        self.mode, self.redis = mode, redis
        self._admin_hash = sha256(admin_key) if admin_key else None
        if mode == "off":
            log.warning("AUTHENTICATION IS OFF (OPD_AUTH=off): anyone who reaches this port can use the teacher")
        elif redis is None:
            log.warning("AUTHENTICATION IS OFF: no experiments registry (OPD_REDIS_URL unset); "
                        "set OPD_REDIS_URL and create experiments to require keys")

    async def authenticate(self, authorization: str | None) -> Tenant:
        if self.mode == "off" or self.redis is None:
            return DEFAULT
        token = bearer(authorization)
        if token is None:
            if self.mode == "auto" and not await self.redis.exists(EXPERIMENTS):
                return DEFAULT
            raise Unauthenticated("missing credentials: send `Authorization: Bearer <experiment key>` "
                                  "(gRPC metadata `authorization`); `opd experiments create` issues keys")
        h = sha256(token)
        if self._admin_hash and hmac.compare_digest(h, self._admin_hash):
            return ADMIN
        name = await self.redis.hget(KEYS, h)
        raw = None if name is None else await self.redis.hget(EXPERIMENTS, name)
        exp = None if raw is None else Experiment.from_json(raw)
        if exp is None or not hmac.compare_digest(exp.key_hash, h):
            raise Unauthenticated("unknown, rotated or revoked key; ask the operator for the current one")
        return Tenant(exp.name, exp.weight, exp.max_inflight_tokens)


class UsageRecorder:
    """Per-experiment usage, added up in memory and flushed to Redis every `period_s`, so
    `opd experiments show` sees the figures of every teacher replica."""

    def __init__(self, redis, period_s: float = 1.0):
        self.redis, self.period_s = redis, period_s
        self._acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._task: asyncio.Task | None = None

    def add(self, experiment: str, **amounts: float) -> None:
        acc = self._acc[experiment]
        for k, v in amounts.items():
            acc[k] += v

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            await self.flush()

    async def flush(self) -> None:
        acc, self._acc = self._acc, defaultdict(lambda: defaultdict(float))
        if not acc:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for exp, amounts in acc.items():
                for k, v in amounts.items():
                    pipe.hincrbyfloat(USAGE_PREFIX + exp, k, v)
            await pipe.execute()
        except Exception as e:  # usage is best effort; serving must not fail on it
            log.warning("could not record usage in Redis: %s", e)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.flush()
