"""`opd experiments create|list|show|update|rotate-key|delete|sync-acl`: the operator's CLI.

It talks to the registry in Redis directly (OPD_REDIS_URL, with an admin Redis user), running
the same registry code as the teacher's admin HTTP routes. Credentials are printed once.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from opd_services.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("experiments", help="manage experiments: keys, weights, quotas, Redis ACL users")
    p.add_argument("--redis-url", help="OPD_REDIS_URL of the registry (an admin Redis user)")
    p.add_argument("--json", action="store_true", help="print JSON")
    ops = p.add_subparsers(dest="op", required=True)
    for name in ("create", "update"):
        op = ops.add_parser(name, help=f"{name} an experiment")
        op.add_argument("name")
        op.add_argument("--weight", type=float, help="share of teacher time relative to others (default 1)")
        op.add_argument("--max-inflight-tokens", type=int, help="tokens in flight at the teacher; over it -> 429")
        op.add_argument("--max-backlog", type=int, help="rollouts waiting + being scored; over it -> QueueFull")
        op.add_argument("--teacher", help="default teacher of its rollouts (a name in the scorers' OPD_TEACHERS)")
    ops.add_parser("list", help="list experiments")
    for name, text in (("show", "an experiment and its usage"), ("rotate-key", "issue a new API key"),
                       ("delete", "revoke an experiment's credentials")):
        ops.add_parser(name, help=text).add_argument("name")
    ops.add_parser("sync-acl", help="recreate every experiment's Redis ACL user (after a Redis restart)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opd_client.queue.connection import connect
    from opd_services.config import Settings
    from opd_services.tenancy.registry import Registry

    settings = Settings.load(redis_url=args.redis_url)
    if settings.redis_url is None:
        raise ConfigError("OPD_REDIS_URL is unset: `opd experiments` manages the registry of a running "
                          "deployment; point it at that Redis (redis://admin:PASSWORD@HOST:6379)")
    reg = Registry(connect(settings.redis_url))
    limits = {k: getattr(args, k, None) for k in ("weight", "max_inflight_tokens", "max_backlog", "teacher")}
    if args.op == "create":
        creds = reg.create(args.name, **{k: v for k, v in limits.items() if v is not None})
        out = asdict(creds)
        text = (f"experiment {creds.experiment} created. These credentials are shown only once:\n"
                f"  API key (Authorization: Bearer ...): {creds.api_key}\n"
                f"  Redis user / password:             {creds.redis_user} / {creds.redis_password}\n"
                f"  trainer OPD_REDIS_URL:             redis://{creds.redis_user}:{creds.redis_password}@HOST:6379")
    elif args.op == "update":
        out = reg.update(args.name, **limits).public()
        text = _fmt(out)
    elif args.op == "list":
        out = [e.public() for e in reg.list()]
        text = "\n".join(f"{e['name']:<24} weight={e['weight']:<6g} max_inflight_tokens={e['max_inflight_tokens']} "
                         f"max_backlog={e['max_backlog']} teacher={e['teacher'] or '(default)'}"
                         for e in out) or "no experiments"
    elif args.op == "show":
        out = {**reg.require(args.name).public(), "usage": reg.usage(args.name)}
        text = _fmt(out)
    elif args.op == "rotate-key":
        creds = reg.rotate_key(args.name)
        out = asdict(creds)
        text = f"new API key for {creds.experiment} (the old one no longer works): {creds.api_key}"
    elif args.op == "delete":
        reg.delete(args.name)
        out, text = {"deleted": args.name}, f"experiment {args.name} deleted; its key and Redis user no longer work"
    else:
        n = reg.sync_acl()
        out, text = {"synced": n}, f"{n} ACL user(s) recreated"
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


def _fmt(d: dict) -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines += [f"  {kk:<16} {vv:,.1f}" for kk, vv in v.items()]
        else:
            lines.append(f"{k:<20} {v}")
    return "\n".join(lines)
