"""The experiments registry, kept in Redis: names, weights, quotas, hashed API keys, ACL users.

Layout (admin-only keys; no experiment's ACL user can touch them):
  opd:registry:experiments   HASH name -> JSON record (weight, quotas, key hash, ACL password hash)
  opd:registry:keys          HASH sha256(api key) -> name
  opd:registry:usage:NAME    HASH requests, scored_tokens, teacher_ms, rejections
API keys and Redis passwords are shown once, at creation or rotation, and stored only as
sha256 hashes (the ACL user gets `#<sha256>`, so `sync_acl` can recreate users after a Redis
restart without any plaintext). This module does not authenticate requests (see `auth`).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field

from opd_client.queue.keys import check_experiment
from opd_services.errors import InvalidRequest

EXPERIMENTS = "opd:registry:experiments"
KEYS = "opd:registry:keys"
USAGE_PREFIX = "opd:registry:usage:"
USAGE_FIELDS = ("requests", "scored_tokens", "teacher_ms", "rejections")

# What a producer (sampler) and a consumer (trainer) of one experiment need, and no more.
ACL_COMMANDS = (
    "+ping", "+hello", "+auth", "+client|setinfo", "+client|setname", "+info", "+command",
    "+cluster|slots", "+cluster|shards", "+cluster|nodes", "+readonly",
    "+xadd", "+xreadgroup", "+xack", "+xautoclaim", "+xclaim", "+xgroup|create", "+xinfo|groups",
    "+xinfo|stream", "+xlen", "+xpending", "+xrange", "+xtrim", "+multi", "+exec", "+discard",
)


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def acl_user(name: str) -> str:
    return f"opd-{name}"


@dataclass
class Experiment:
    name: str
    weight: float = 1.0
    max_inflight_tokens: int | None = None     # at the teacher; None = unlimited
    max_backlog: int | None = None             # rollouts waiting + being scored
    key_hash: str = ""
    acl_password_hash: str = ""
    created_at: float = field(default_factory=time.time)
    key_rotated_at: float = field(default_factory=time.time)
    teacher: str | None = None                 # default teacher of its rollouts; None = the scorer's default

    def to_json(self) -> str:
        d = asdict(self)
        if d["teacher"] is None:      # records without it stay readable by releases before teachers
            del d["teacher"]
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Experiment":
        d = json.loads(raw)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})   # newer fields: ignored

    def public(self) -> dict:
        """What an operator may see: everything but the hashes."""
        d = asdict(self)
        d.pop("key_hash")
        d.pop("acl_password_hash")
        d["redis_user"] = acl_user(self.name)
        return d


@dataclass(frozen=True)
class Credentials:
    """Shown once. The API key goes in `Authorization: Bearer`; the Redis user/password in the
    trainer's OPD_REDIS_URL (redis://USER:PASSWORD@HOST:PORT)."""
    experiment: str
    api_key: str
    redis_user: str
    redis_password: str | None


def check_teacher(teacher) -> None:
    from opd_client.teachers import NAME
    if teacher is not None and (not isinstance(teacher, str) or not NAME.match(teacher)):
        raise InvalidRequest("teacher", f"must be a teacher's name (lower-case letters, digits, '_', '.', '-'), "
                                        f"got {teacher!r}")


def check_limits(weight, max_inflight_tokens, max_backlog) -> None:
    if weight is not None and (not isinstance(weight, (int, float)) or not 0 < weight <= 1000):
        raise InvalidRequest("weight", f"must be a number in (0, 1000], got {weight!r}")
    for fname, v in (("max_inflight_tokens", max_inflight_tokens), ("max_backlog", max_backlog)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidRequest(fname, f"must be a positive integer or unset, got {v!r}")


class Registry:
    """Admin operations on a redis-py client (Redis, Valkey or RedisCluster)."""

    def __init__(self, redis):
        self.redis = redis

    # ---- reads ---------------------------------------------------------------------------

    def get(self, name: str) -> Experiment | None:
        raw = self.redis.hget(EXPERIMENTS, name)
        return None if raw is None else Experiment.from_json(raw)

    def require(self, name: str) -> Experiment:
        exp = self.get(check_experiment(name))
        if exp is None:
            raise InvalidRequest("name", f"no experiment named {name!r}; `opd experiments list` shows them")
        return exp

    def list(self) -> list[Experiment]:
        return sorted((Experiment.from_json(v) for v in self.redis.hgetall(EXPERIMENTS).values()),
                      key=lambda e: e.name)

    def usage(self, name: str) -> dict[str, float]:
        raw = self.redis.hgetall(USAGE_PREFIX + name)
        got = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
        return {f: got.get(f, 0.0) for f in USAGE_FIELDS}

    # ---- writes --------------------------------------------------------------------------

    def create(self, name: str, *, weight: float = 1.0, max_inflight_tokens: int | None = None,
               max_backlog: int | None = None, teacher: str | None = None) -> Credentials:
        check_experiment(name)
        check_limits(weight, max_inflight_tokens, max_backlog)
        check_teacher(teacher)
        key, password = "opd_" + secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        exp = Experiment(name, float(weight), max_inflight_tokens, max_backlog, sha256(key), sha256(password),
                         teacher=teacher)
        if not self.redis.hsetnx(EXPERIMENTS, name, exp.to_json()):
            raise InvalidRequest("name", f"experiment {name!r} already exists; use `update` or `rotate-key`")
        self.redis.hset(KEYS, exp.key_hash, name)
        self._set_acl(exp)
        return Credentials(name, key, acl_user(name), password)

    def update(self, name: str, *, weight: float | None = None, max_inflight_tokens: int | None = None,
               max_backlog: int | None = None, teacher: str | None = None) -> Experiment:
        check_limits(weight, max_inflight_tokens, max_backlog)
        check_teacher(teacher)
        exp = self.require(name)
        if teacher is not None:
            exp.teacher = teacher
        if weight is not None:
            exp.weight = float(weight)
        if max_inflight_tokens is not None:
            exp.max_inflight_tokens = max_inflight_tokens
        if max_backlog is not None:
            exp.max_backlog = max_backlog
        self.redis.hset(EXPERIMENTS, name, exp.to_json())
        return exp

    def rotate_key(self, name: str) -> Credentials:
        """A new API key; the old one stops working on its next request."""
        exp = self.require(name)
        key = "opd_" + secrets.token_urlsafe(32)
        old, exp.key_hash, exp.key_rotated_at = exp.key_hash, sha256(key), time.time()
        self.redis.hset(KEYS, exp.key_hash, name)
        self.redis.hset(EXPERIMENTS, name, exp.to_json())
        self.redis.hdel(KEYS, old)
        return Credentials(name, key, acl_user(name), None)

    def delete(self, name: str) -> None:
        """Credentials stop working at once (Redis also drops the ACL user's connections).
        The experiment's streams are left for an operator to inspect or remove."""
        exp = self.require(name)
        self.redis.hdel(KEYS, exp.key_hash)
        self.redis.hdel(EXPERIMENTS, name)
        self._on_all_nodes("ACL", "DELUSER", acl_user(name))

    def sync_acl(self) -> int:
        """(Re)create every experiment's ACL user from the registry, e.g. after a Redis restart."""
        exps = self.list()
        for exp in exps:
            self._set_acl(exp)
        return len(exps)

    def _set_acl(self, exp: Experiment) -> None:
        self._on_all_nodes("ACL", "SETUSER", acl_user(exp.name), "reset", "on", f"#{exp.acl_password_hash}",
                           f"~opd:{{{exp.name}}}:*", "resetchannels", "-@all", *ACL_COMMANDS)

    def _on_all_nodes(self, *args) -> None:
        from redis.cluster import RedisCluster
        if isinstance(self.redis, RedisCluster):
            self.redis.execute_command(*args, target_nodes=RedisCluster.ALL_NODES)
        else:
            self.redis.execute_command(*args)
