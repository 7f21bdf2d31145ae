"""A teacher that fails inside: an engine that raises (a real uniform engine with a fault put
in its score call, injected through the server's engine factory). Each surface answers 500 /
INTERNAL with a request id and no stack trace or exception text; the id is in the teacher's
log next to the traceback; the teacher keeps serving."""
from __future__ import annotations

import http.client
import logging
import time

import grpc
import httpx
import orjson
import pytest

from opd_client import Sequence, TeacherClient
from opd_client.client import NO_RETRY
from opd_client.errors import InternalError
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc
from opd_services.teacher.engines.uniform_engine import UniformEngine
from opd_services.teacher.server import BackgroundTeacher

SECRET = "engine-internals-at-/srv/weights/shard-7"


class FaultyEngine(UniformEngine):
    """The uniform engine, raising on any sequence that starts with token 13."""

    def score(self, items):
        if any(int(it.token_ids[0]) == 13 for it in items):
            raise RuntimeError(f"CUDA error: {SECRET}")
        return super().score(items)


@pytest.fixture(scope="module")
def faulty(settings):
    with BackgroundTeacher(settings, engine=lambda: FaultyEngine(vocab_size=64, max_model_len=128)) as t:
        yield t


def _no_leak(text: str) -> None:
    assert SECRET not in text and "Traceback" not in text and "RuntimeError" not in text and ".py" not in text, text


def test_http_internal_error_is_500_with_a_request_id_and_no_stack_trace(faulty, caplog):
    caplog.set_level(logging.ERROR)
    r = httpx.post(f"{faulty.http_url}/v1/score", json={"sequences": [{"token_ids": [13, 2, 3]}]}, timeout=10)
    assert r.status_code == 500, r.text
    _no_leak(r.text)
    err = r.json()["error"]
    assert err["code"] == "internal" and len(err["request_id"]) == 16 and err["request_id"] in err["message"]
    assert err["request_id"] in caplog.text and SECRET in caplog.text          # the operator can find it
    with TeacherClient(faulty.http_url, retry=NO_RETRY) as c:
        with pytest.raises(InternalError) as e:
            c.score([Sequence(token_ids=[13, 2, 3])])
        assert e.value.request_id and e.value.request_id in caplog.text
        _no_leak(str(e.value))
        assert c.score([[1, 2, 3]]).results[0].logprobs_T.shape == (2,)          # still serving


def test_http_connection_stays_usable_after_a_500(faulty):
    """The 500 is a complete answer: the server keeps the keep-alive connection, so a client's
    next request on it is served (a close there would reset whoever reused it first)."""
    host, port = faulty.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for token, status in ((13, 500), (1, 200), (13, 500), (1, 200)):
            conn.request("POST", "/v1/score", body=orjson.dumps({"sequences": [{"token_ids": [token, 2, 3]}]}),
                         headers={"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            assert r.status == status and r.getheader("connection") != "close"
            time.sleep(0.3)                                   # a server closing the connection has done so now
    finally:
        conn.close()


def test_grpc_internal_error_is_INTERNAL_with_a_request_id_and_no_stack_trace(faulty, caplog):
    caplog.set_level(logging.ERROR)
    with grpc.insecure_channel(faulty.grpc_url.removeprefix("grpc://")) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.TeacherStub(ch).Score(pb.ScoreRequest(sequences=[pb.Sequence(token_ids=[13, 2, 3])]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    _no_leak(e.value.details())
    rid = dict(e.value.trailing_metadata())["opd-request-id"]
    assert len(rid) == 16 and rid in e.value.details() and rid in caplog.text and SECRET in caplog.text
    with TeacherClient(faulty.grpc_url, retry=NO_RETRY) as c:
        with pytest.raises(InternalError) as e:
            c.score([Sequence(token_ids=[13, 2, 3])])
        assert e.value.request_id and e.value.request_id in caplog.text
        _no_leak(str(e.value))
        assert c.score([[1, 2, 3]]).results[0].logprobs_T.shape == (2,)
