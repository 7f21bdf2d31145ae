"""`generate` names the client's teacher on the wire, as `score` does, over both transports, sync
and async, against a real teacher (OPD_TEACHER_NAME "default"): its own name is served, another
name is NotFound with the same words as score's, no name is served by any teacher."""
from __future__ import annotations

import asyncio

import pytest

from opd_client import AsyncTeacherClient, NotFound, TeacherClient


def call(url: str, is_async: bool, teacher: str | None, method: str):
    args = ([[1, 2, 3]],)
    kw = dict(max_tokens=2, seed=5) if method == "generate" else {}
    if is_async:
        async def go():
            async with AsyncTeacherClient(url, teacher=teacher) as c:
                return await getattr(c, method)(*args, **kw)
        return asyncio.run(go())
    with TeacherClient(url, teacher=teacher) as c:
        return getattr(c, method)(*args, **kw)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_generate_names_the_teacher(teacher, transport, is_async):
    url = teacher.http_url if transport == "http" else teacher.grpc_url
    for name in ("default", None):
        out = call(url, is_async, name, "generate")
        assert len(out.results[0].token_ids_T) == 2 and out.model.teacher == "default"
    with pytest.raises(NotFound) as gen:
        call(url, is_async, "math", "generate")
    with pytest.raises(NotFound) as score:
        call(url, is_async, "math", "score")
    assert "teacher 'math' is not served here" in str(gen.value) and str(gen.value) == str(score.value)
