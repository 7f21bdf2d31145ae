"""Client behaviour that needs no teacher: URL parsing, unreachable service, retry policy."""
import socket
import time

import pytest

from opd_client import InvalidRequest, RetryPolicy, TeacherClient, Unavailable
from opd_client.client import _parse_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_schemes():
    assert _parse_url("http://127.0.0.1:8000/") == ("http", "http://127.0.0.1:8000")
    assert _parse_url("grpc://127.0.0.1:50051") == ("grpc", "127.0.0.1:50051")
    assert _parse_url("grpc://[::1]:50051") == ("grpc", "[::1]:50051")
    with pytest.raises(InvalidRequest, match="scheme"):
        _parse_url("ftp://x:1")
    with pytest.raises(InvalidRequest, match="port"):
        _parse_url("grpc://hostonly")


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
