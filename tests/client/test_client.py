"""Client behaviour that needs no teacher: URL parsing, unreachable service, retry policy."""
import socket
import time

import pytest

from opd_client import InvalidRequest, RetryPolicy, TeacherClient, Unavailable
from opd_client.targets import parse_target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _t(url):
    t = parse_target(url)
    return t.transport, t.addresses, t.dns


def test_url_schemes():
    assert _t("http://127.0.0.1:8000/") == ("http", ("http://127.0.0.1:8000",), False)
    assert _t("grpc://127.0.0.1:50051") == ("grpc", ("127.0.0.1:50051",), False)
    assert _t("grpc://[::1]:50051") == ("grpc", ("[::1]:50051",), False)
    assert _t("h:50051") == ("grpc", ("h:50051",), False)
    with pytest.raises(InvalidRequest, match="scheme"):
        parse_target("ftp://x:1")
    with pytest.raises(InvalidRequest, match="port"):
        parse_target("grpc://hostonly")


def test_several_replicas_and_dns_names():
    assert _t("grpc://h1:50051, h2:50052") == ("grpc", ("h1:50051", "h2:50052"), False)
    assert _t("http://h1:8000,h2:8000/x/") == ("http", ("http://h1:8000/x", "http://h2:8000/x"), False)
    assert _t("grpc+dns://opd-teacher-headless:50051") == ("grpc", ("dns:///opd-teacher-headless:50051",), True)
    assert _t("http+dns://localhost:8000") == ("http", ("http://localhost:8000",), True)
    with pytest.raises(InvalidRequest, match="empty"):
        parse_target("grpc://h1:1,,h2:2")
    with pytest.raises(InvalidRequest, match="one name"):
        parse_target("grpc+dns://a:1,b:1")
    with pytest.raises(InvalidRequest, match="'h2'"):
        parse_target("grpc://h1:1,h2")


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_unreachable_teacher_says_what_to_check_after_retries(scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"
    policy = RetryPolicy(attempts=3, backoff_s=0.05, max_backoff_s=0.05)
    t0 = time.monotonic()
    with TeacherClient(url, retry=policy, timeout=2) as c:
        with pytest.raises(Unavailable) as e:
            c.score([[1, 2, 3]])
    msg = str(e.value)
    assert url in msg and "3 attempt" in msg and "opd serve" in msg and "OPD_TEACHER_URL" in msg
    assert isinstance(e.value, ConnectionError)
    assert time.monotonic() - t0 < 10


def test_retry_backoff_is_bounded():
    p = RetryPolicy(attempts=5, backoff_s=0.2, max_backoff_s=1.0)
    assert all(0 <= p.delay(i) <= 1.0 for i in range(10))
