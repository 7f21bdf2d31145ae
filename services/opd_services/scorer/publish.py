"""The scorer's one atomic step per batch: publish each outcome and ack its rollout.

A Lua script (run atomically, like MULTI/EXEC, in one hash slot: every key is
`opd:{EXP}:...`) does, for each rollout entry: if the entry is still pending *for this
scorer*, XADD the scored entry (or the dead letter) and XACK the rollout; otherwise skip
it. The ownership check is what plain MULTI/EXEC cannot give: a scorer stalled past
the reclaim timeout (teacher outage, GC pause) finds its entries taken over by another
scorer and publishes nothing, so no rollout is ever scored twice. A crash before the
script runs leaves the entries pending, to be reclaimed. Re-running the script after a
lost reply is harmless: the acked entries are no longer pending.
This module does not score and does not read rollouts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from opd_client.queue import keys

_PUBLISH = """
local group, consumer = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV - 1, 5 do
  local id, kind, payload, reason, rid = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local mine = redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)
  if #mine == 1 then
    if kind == 's' then
      redis.call('XADD', KEYS[2], '*', 'd', payload)
    else
      redis.call('XADD', KEYS[3], '*', 'd', payload, 'reason', reason, 'stage', 'scorer',
                 'rollout_id', rid, 'at', ARGV[#ARGV])
    end
    redis.call('XACK', KEYS[1], group, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


# Keep entries this scorer still owns from looking idle (while it waits out a teacher outage),
# so other scorers do not reclaim them and redo the same work. XCLAIM resets the idle time.
_TOUCH = """
local n = 0
for i = 3, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one rollout entry: scored (payload = encoded ScoredRollout) or dead."""

    entry_id: str
    payload: bytes            # scored: the ScoredRollout bytes; dead: the original rollout bytes
    dead_reason: str = ""     # non-empty = dead-letter with this reason
    rollout_id: str = ""

    @property
    def dead(self) -> bool:
        return bool(self.dead_reason)


class Publisher:
    def __init__(self, redis, consumer: str):
        self.redis = redis
        self.consumer = consumer
        self._script = redis.register_script(_PUBLISH)
        self._touch = redis.register_script(_TOUCH)

    def touch(self, exp: str, entry_ids: list[str]) -> int:
        """Reset the idle time of those of `entry_ids` still pending for this scorer; returns how many."""
        if not entry_ids:
            return 0
        return int(self._touch(keys=[keys.rollouts_key(exp)], args=[keys.GROUP_SCORERS, self.consumer, *entry_ids]))

    def publish(self, exp: str, outcomes: list[Outcome]) -> list[bool]:
        """Atomically publish + ack; True per outcome this scorer published, False where the
        entry had been taken over (or acked) meanwhile and was left alone."""
        if not outcomes:
            return []
        args: list = [keys.GROUP_SCORERS, self.consumer]
        for o in outcomes:
            args += [o.entry_id, "d" if o.dead else "s", o.payload, o.dead_reason, o.rollout_id]
        args.append(repr(time.time()))
        # ARGV = group, consumer, 5 per outcome, then "at" (the loop stops before it)
        done = self._script(keys=[keys.rollouts_key(exp), keys.scored_key(exp), keys.dead_key(exp)], args=args)
        return [bool(x) for x in done]
