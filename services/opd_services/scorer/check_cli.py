"""`opd fleet check`: compare a teacher's replicas once, on an experiment's latest rollouts.

For a CronJob or by hand, next to the scorers' own sampled check (agreement.py): reads the
last `--count` rollouts of `--experiment` that go to the teacher (Redis XREVRANGE, nothing
is consumed), scores them on every replica of it, prints each pair's largest logprob
difference and identity, and exits 1 when a pair is above `--threshold` or differs in
identity (0 when they agree, 2 on a usage or configuration error).
This module only reads the queue; it publishes and acknowledges nothing.
"""
from __future__ import annotations

import argparse
import json

from opd_services.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("fleet", help="teacher fleet: compare the replicas of a teacher")
    ops = p.add_subparsers(dest="op", required=True)
    c = ops.add_parser("check", help="score an experiment's latest rollouts on every replica of its teacher")
    c.add_argument("--experiment", required=True, help="whose latest rollouts to use (opd:{EXP}:rollouts)")
    c.add_argument("--teacher", help="teacher name (default: the experiment's default teacher, else the first)")
    c.add_argument("--count", type=int, default=16, help="rollouts to compare (default 16)")
    c.add_argument("--threshold", type=float, default=1e-3, help="largest tolerated |logprob diff| (default 1e-3)")
    c.add_argument("--redis-url", help="OPD_REDIS_URL")
    c.add_argument("--teachers", help="OPD_TEACHERS")
    c.add_argument("--teacher-url", help="OPD_TEACHER_URL (one teacher)")
    c.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _sequences(redis, exp: str, teacher: str, count: int, default: str) -> list:
    from opd_client.codec import PayloadError, decode_rollout
    from opd_client.queue import keys
    from opd_client.types import Sequence
    out = []
    for _id, fields in redis.xrevrange(keys.rollouts_key(exp), count=count * 4):
        try:
            r = decode_rollout(fields.get(keys.FIELD, b""))
        except PayloadError:
            continue
        if (r.teacher or default) == teacher and len(r.token_ids) >= 2 and r.score_from >= 1:
            out.append(Sequence(token_ids=r.token_ids, score_from=r.score_from, id=r.id))
        if len(out) == count:
            break
    return out


def run(args: argparse.Namespace) -> int:
    from opd_client.queue.connection import connect
    from opd_services.config import Settings
    from opd_services.scorer.agreement import ReplicaCheck
    from opd_services.scorer.worker import registry_records

    s = Settings.load(redis_url=args.redis_url, teachers=args.teachers, teacher_url=args.teacher_url)
    if s.redis_url is None:
        raise ConfigError("OPD_REDIS_URL is unset: `opd fleet check` reads the experiment's rollouts from Redis")
    urls = s.teacher_urls()
    redis = connect(s.redis_url)
    rec = registry_records(redis).get(args.experiment)
    default = (rec.teacher if rec and rec.teacher else None) or next(iter(urls))
    teacher = args.teacher or default
    if teacher not in urls:
        raise ConfigError(f"unknown teacher {teacher!r}: OPD_TEACHERS knows {', '.join(urls)}")
    seqs = _sequences(redis, args.experiment, teacher, args.count, default)
    if not seqs:
        raise ConfigError(f"no rollouts of experiment {args.experiment!r} for teacher {teacher!r} in its stream")
    check = ReplicaCheck(urls, 1.0, named=s.teachers is not None,
                         client_kw={"tls": s.client_tls(), "api_key": s.teacher_api_key})
    try:
        results = check.check(teacher, seqs)
    finally:
        check.close()
    bad = [r for r in results if r.identity_mismatch or r.max_abs_diff > args.threshold]
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            flag = "DISAGREE" if r in bad else "ok"
            print(f"{r.teacher} {r.pair}: max |diff| {r.max_abs_diff:.3g} {flag} {r.detail}".rstrip())
        if not results:
            print(f"fewer than two replicas of {teacher!r} answered: nothing to compare")
    return 1 if bad else 0
