"""Score a batch of decoded rollouts through their teachers; isolate the ones refused.

Each rollout goes to its teacher: the one it names, else its experiment's default, else
the scorer's default (opd_client.teachers); a name the scorer does not know makes it a dead
letter naming the known ones. Rollouts are grouped by teacher and by the top_k they ask
for (one teacher request per group). When the
teacher refuses a request as invalid, the refused sequence is found (the error names
`sequences[i]`, else the batch is halved until it is) and only that rollout is marked dead
with the teacher's reason; the rest are scored. Transient failures (teacher unreachable,
overloaded, internal error) raise `TeacherDown`: the caller backs off and retries the whole
batch, and nothing is ever dead-lettered for them.
This module does no Redis I/O.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from opd_client import TeacherClient
from opd_client.codec import encode_scored
from opd_client.errors import InvalidRequest, NotFound, OPDError
from opd_client.teachers import Teachers
from opd_client.types import Rollout, ScoredRollout, Sequence
from opd_services.scorer.publish import Outcome

_SEQ_FIELD = re.compile(r"^sequences\[(\d+)\]")


class TeacherDown(Exception):
    """The teacher could not score now (unreachable, overloaded, failing); retry later."""

    def __init__(self, cause: OPDError):
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = float(getattr(cause, "retry_after", 0.0) or 0.0)


@dataclass(frozen=True, slots=True)
class Item:
    entry_id: str
    raw: bytes
    rollout: Rollout


def score_items(teachers: Teachers, items: list[Item], default: str = "", check=None) -> list[Outcome]:
    """One Outcome per item, in no particular order. Raises TeacherDown on transient failure.
    `default`: the experiment's default teacher ("" = the scorer's). `check(name, seqs, resp)`,
    if given, sees every answered request (the replica agreement sampler)."""
    groups: dict[tuple[str, int], list[Item]] = {}
    out: list[Outcome] = []
    for it in items:
        name = it.rollout.teacher or default
        try:
            teachers.get(name)
        except NotFound as e:
            out.append(Outcome(it.entry_id, it.raw, dead_reason=f"teacher: {e}", rollout_id=it.rollout.id))
            continue
        groups.setdefault((name or teachers.default, it.rollout.top_k), []).append(it)
    for (name, k), group in groups.items():
        out += _score_group(teachers.get(name), group, k, check and (lambda s, r, n=name: check(n, s, r)))
    return out


def _score_group(teacher: TeacherClient, items: list[Item], top_k: int, check=None) -> list[Outcome]:
    out = [_dead(it, err, by="the scorer refused it") for it in items if (err := _local_check(it.rollout))]
    items = [it for it in items if not _local_check(it.rollout)]
    if not items:
        return out
    seqs = [Sequence(token_ids=it.rollout.token_ids, score_from=it.rollout.score_from, id=it.rollout.id)
            for it in items]
    try:
        resp = teacher.score(seqs, top_k=top_k)
    except InvalidRequest as e:
        return out + _isolate(teacher, items, top_k, e)
    except OPDError as e:
        raise TeacherDown(e) from e
    if check is not None:
        check(seqs, resp)
    now, rev, name = time.time(), resp.model.revision, resp.model.teacher or teacher.teacher
    for it, res in zip(items, resp.results):
        try:
            s = ScoredRollout(rollout=it.rollout, teacher_logprobs=res.logprobs_T, top_ids=res.top_ids_T_K,
                              top_logprobs=res.top_logprobs_T_K, model_revision=rev, scored_at=now, teacher=name)
        except InvalidRequest as e:   # the teacher's answer does not fit the rollout: never publish it
            out.append(_dead(it, InvalidRequest(e.field, f"teacher answer does not fit the rollout: {e.reason}")))
            continue
        out.append(Outcome(it.entry_id, encode_scored(s), rollout_id=it.rollout.id))
    return out


def _local_check(r: Rollout) -> InvalidRequest | None:
    """What the wire cannot carry faithfully: score_from 0 reads as "unset" (= 1) in proto3."""
    if len(r.token_ids) < 2:
        return InvalidRequest("token_ids", f"needs at least 2 tokens, got {len(r.token_ids)}")
    if r.score_from < 1:
        return InvalidRequest("score_from", "must be >= 1: the first token has no context to score it")
    return None


def _dead(it: Item, e: InvalidRequest, by: str = "the teacher refused it") -> Outcome:
    field = _SEQ_FIELD.sub("rollout", e.field)
    return Outcome(it.entry_id, it.raw, dead_reason=f"{by}: {field}: {e.reason}", rollout_id=it.rollout.id)


def _isolate(teacher: TeacherClient, items: list[Item], top_k: int, e: InvalidRequest) -> list[Outcome]:
    """Dead-letter what the teacher refused, score the rest."""
    if len(items) == 1:
        return [_dead(items[0], e)]
    m = _SEQ_FIELD.match(e.field)
    if m and int(m.group(1)) < len(items):
        i = int(m.group(1))
        rest = items[:i] + items[i + 1:]
        return [_dead(items[i], e)] + _score_group(teacher, rest, top_k)
    half = len(items) // 2          # a request-level refusal (e.g. too many tokens): split
    return _score_group(teacher, items[:half], top_k) + _score_group(teacher, items[half:], top_k)
