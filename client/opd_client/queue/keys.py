"""Names and small stream chores of the queue: keys, groups, safe trimming, backlog.

Every key of one experiment carries the hash tag `{EXP}`, so all of them live in one Redis
Cluster slot and a scorer can publish and ack in one atomic step. This module sends only the
read-mostly commands it names (XINFO, XPENDING, XTRIM); producing and consuming live in
`producer` and `consumer`.
"""
from __future__ import annotations

import re

from opd_client.errors import InvalidRequest

GROUP_SCORERS = "scorers"       # on opd:{EXP}:rollouts
GROUP_TRAINERS = "trainers"     # on opd:{EXP}:scored
FIELD = b"d"                    # the one field of a rollout / scored entry: the codec's bytes
ROLLOUTS_MATCH = "opd:{*}:rollouts"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^opd:\{([^{}]+)\}:rollouts$")


def check_experiment(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest("experiment", f"{name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
                                           "starting with a letter or digit")
    return name


def rollouts_key(exp: str) -> str:
    return f"opd:{{{exp}}}:rollouts"


def scored_key(exp: str) -> str:
    return f"opd:{{{exp}}}:scored"


def dead_key(exp: str) -> str:
    return f"opd:{{{exp}}}:dead"


def experiment_of(rollouts_key_name: str | bytes) -> str | None:
    """The experiment of an `opd:{EXP}:rollouts` key, or None if the key is not one."""
    k = rollouts_key_name.decode() if isinstance(rollouts_key_name, bytes) else rollouts_key_name
    m = _KEY.match(k)
    return m.group(1) if m else None


def as_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _older(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) < tuple(map(int, b.split("-")))


def ensure_group(r, key: str, group: str) -> None:
    """Create `group` on `key` from the very first entry (id 0), creating the stream if needed."""
    from redis.exceptions import ResponseError
    try:
        r.xgroup_create(key, group, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def trim_floor(r, key: str) -> str | None:
    """The lowest id that some group still needs: its oldest pending entry, or just past the
    last one it was delivered. Everything below it is consumed by every group. None when the
    stream has no group (then nothing is known to be consumed and nothing may be trimmed)."""
    groups = r.xinfo_groups(key)
    if not groups:
        return None
    floor = None
    for g in groups:
        name, last = as_str(g["name"]), as_str(g["last-delivered-id"])
        need = _next_id(last)
        if int(g["pending"]):
            oldest = r.xpending(key, name)["min"]      # None if all were acked meanwhile
            if oldest is not None and _older(as_str(oldest), need):
                need = as_str(oldest)
        floor = need if floor is None or _older(need, floor) else floor
    return floor


def trim_consumed(r, key: str) -> int:
    """XTRIM MINID below every group's floor: consumed entries go, unconsumed ones never do."""
    floor = trim_floor(r, key)
    if floor is None or floor == "0-1":
        return 0
    return int(r.xtrim(key, minid=floor, approximate=False))


def backlog_of(groups: list[dict], xlen: int) -> int:
    """Entries of a rollout stream not yet done by the scorers: undelivered (lag) + pending."""
    for g in groups:
        if as_str(g["name"]) == GROUP_SCORERS:
            lag = g.get("lag")
            return (xlen if lag is None else int(lag) + int(g["pending"]))
    return xlen
