"""The client's documented schedules on a fake clock: a failed replica is out of rotation for
0.5 s, doubling on each further failure up to 10 s (balance.Pool), and an http+dns name is
resolved again every 30 s (the client's `_call`, the path of every request). No server runs:
the http+dns replicas are httpx clients that are never used to send."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from opd_client import TeacherClient, balance
from opd_client import client as client_module
from opd_client.targets import DNS_REFRESH_S


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def monotonic(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(balance, "time", SimpleNamespace(monotonic=c.monotonic))
    monkeypatch.setattr(client_module, "time", SimpleNamespace(monotonic=c.monotonic, sleep=time.sleep))
    return c


def test_ejection_is_half_a_second_doubling_to_ten(clock):
    pool = balance.Pool(["a", "b"], connect=lambda a: a)
    a, b = pool.replicas
    outs = []
    for _ in range(7):
        pool.failed(a)
        outs.append(a.out_until - clock.t)
    assert outs == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    pool.succeeded(a)                                  # one success puts it fully back
    assert (a.failures, a.out_until) == (0, 0.0)
    pool.failed(a)
    assert a.out_until - clock.t == 0.5


def test_an_ejected_replica_is_skipped_until_its_time_is_up(clock):
    pool = balance.Pool(["a", "b"], connect=lambda a: a)
    a, b = pool.replicas
    pool.failed(a)
    pool.failed(a)                                     # second failure in a row: out for 1 s
    clock.t += 0.75                                    # (binary-exact steps: no rounding at the edge)
    assert {pool.pick().address for _ in range(4)} == {"b"}
    clock.t += 0.25
    assert {pool.pick().address for _ in range(4)} == {"a", "b"}


def test_an_http_dns_name_is_resolved_again_every_30_s(clock, monkeypatch):
    answers = [["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
               ["http://10.0.0.2:8000", "http://10.0.0.3:8000"],
               ["http://10.0.0.3:8000"]]
    asked = []
    monkeypatch.setattr(client_module, "resolve", lambda url: asked.append(url) or answers[len(asked) - 1])
    assert DNS_REFRESH_S == 30.0
    with TeacherClient("http+dns://teacher.example:8000") as c:
        assert asked == ["http://teacher.example:8000"]                 # at construction
        first = {r.address: r.conn for r in c.pool.replicas}
        clock.t += 29.75
        c._call(lambda conn: conn)
        assert len(asked) == 1
        clock.t += 0.25                                                   # 30 s since: resolved again
        c._call(lambda conn: conn)
        assert len(asked) == 2
        assert [r.address for r in c.pool.replicas] == answers[1]
        assert c.pool.replicas[0].conn is first["http://10.0.0.2:8000"]   # a replica still named is kept
        assert first["http://10.0.0.1:8000"].is_closed                   # a dropped one is closed
        clock.t += 29.75
        c._call(lambda conn: conn)
        assert len(asked) == 2                                           # 30 s from the last resolution
        clock.t += 0.25
        c._call(lambda conn: conn)
        assert len(asked) == 3 and [r.address for r in c.pool.replicas] == answers[2]


def test_a_plain_http_target_is_never_resolved(clock, monkeypatch):
    monkeypatch.setattr(client_module, "resolve", lambda url: pytest.fail("resolved a plain http target"))
    with TeacherClient("http://10.0.0.1:8000,10.0.0.2:8000") as c:
        clock.t += 10 * DNS_REFRESH_S
        c._call(lambda conn: conn)
        assert [r.address for r in c.pool.replicas] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
