"""A client that sends its body one byte a second holds its connection for at most
OPD_HTTP_BODY_TIMEOUT_S: then it gets 408 and the teacher closes the connection, while other
requests are served meanwhile."""
from __future__ import annotations

import json
import socket
import threading
import time

from opd_client import TeacherClient
from opd_services.teacher.engines.uniform_engine import UniformEngine
from opd_services.teacher.server import BackgroundTeacher

TIMEOUT_S = 2.0


def _trickle(port: int, stop: threading.Event) -> tuple[bytes, float]:
    """POST /v1/score announcing 200 bytes, then one byte a second; returns (all bytes read, seconds)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n")
    s.setblocking(False)
    got = b""
    while time.monotonic() - t0 < 20 and not stop.is_set():
        try:
            s.send(b" ")
        except OSError:
            break
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            except OSError:
                chunk = b""
            if not chunk:
                s.close()
                return got, time.monotonic() - t0      # the teacher closed the connection
            got += chunk
    s.close()
    return got, time.monotonic() - t0


def test_a_byte_a_second_client_is_cut_off_after_the_body_timeout(settings):
    s = settings.model_copy(update={"http_body_timeout_s": TIMEOUT_S})
    with BackgroundTeacher(s, engine=lambda: UniformEngine(vocab_size=64, max_model_len=128)) as t:
        stop, out = threading.Event(), {}
        slow = threading.Thread(target=lambda: out.update(r=_trickle(t.server.http_port, stop)))
        slow.start()
        time.sleep(0.5)
        with TeacherClient(t.http_url) as c:                 # others are served meanwhile
            assert len(c.score([[1, 2, 3]]).results) == 1
        slow.join(25)
        stop.set()
        got, held_s = out["r"]
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert held_s < TIMEOUT_S + 2.0, f"the connection was held {held_s:.1f}s"
