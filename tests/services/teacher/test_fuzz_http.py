"""Property-based fuzzing of every HTTP route in the published OpenAPI (schemathesis):
native, admin and dialect routes, valid and invalid inputs, each sent with and without a key,
against a real teacher (tiny torch model, real Valkey registry, auth on) on loopback.

Held to: no 5xx, every documented response body matches its schema, and the teacher scores
the same numbers afterwards. Routes are read from /openapi.json, so a new route is fuzzed
without touching this file. Bounded: EXAMPLES per route, mode and auth; derandomized, so a
failure reproduces.
"""
from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings as hsettings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from opd_client import TeacherClient

from fuzz_helpers import ADMIN_KEY, FIXED, fuzz_target

EXAMPLES = 12
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def target(settings):
    with fuzz_target(settings) as t:
        yield t


def _headers(path: str, api_key: str) -> dict:
    admin = path.startswith(("/v1/admin/", "/v1/experiments/"))
    return {"authorization": f"Bearer {ADMIN_KEY if admin else api_key}"}


def _fuzz(op, mode: GenerationMode, api_key: str, seen: list, failures: list) -> None:
    """Each generated case is sent twice: with the right key for its route, and with none."""
    @hsettings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
               suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        for headers in (_headers(op.path, api_key), {}):
            resp = case.call(headers=headers, timeout=30)
            seen.append(resp.status_code)
            try:
                case.validate_response(resp, checks=CHECKS, headers=headers)
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - collected, then asserted empty
                failures.append(f"{op.method.upper()} {op.path} [{mode.value}, {'key' if headers else 'no key'}]: "
                                f"{resp.status_code} {str(e)[:400]}")
    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE   # nothing to get wrong: a route without inputs


def test_every_route_survives_fuzzing(target):
    url = target.teacher.http_url
    with TeacherClient(url, api_key=target.api_key) as c:
        before = c.score(FIXED, top_k=3)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 15, [f"{o.method} {o.path}" for o in ops]
    seen, failures, t0 = [], [], time.monotonic()
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, target.api_key, seen, failures)
    print(f"\nHTTP fuzz: {len(seen)} requests over {len(ops)} routes in {time.monotonic() - t0:.1f}s; "
          f"5xx: {sum(s >= 500 for s in seen)}; statuses: {sorted(set(seen))}")
    assert not failures, "\n".join(failures[:20])
    assert len(seen) >= len(ops) * 4
    assert 401 in seen and 200 in seen and 422 in seen
    # the teacher still answers, with the same numbers
    with TeacherClient(url, api_key=target.api_key) as c:
        after = c.score(FIXED, top_k=3)
    for a, b in zip(before.results, after.results):
        assert (a.logprobs_T == b.logprobs_T).all() and (a.top_ids_T_K == b.top_ids_T_K).all()
    assert httpx.get(f"{url}/readyz").status_code == 200
