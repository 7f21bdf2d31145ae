"""Several teachers by name: parse `OPD_TEACHERS` and hand out one TeacherClient per teacher.

    OPD_TEACHERS='math=grpc://a:50051,b:50051;code=grpc://c:50051'

`;` separates teachers, `=` a name from its target URL (any URL TeacherClient takes: several
replicas comma-separated, or a DNS name). The first teacher listed is the default: it
scores rollouts that name no teacher and whose experiment has no default teacher.
A name unknown here is refused with `NotFound` naming the known ones.
This module parses and routes only; balancing is TeacherClient's, scoring the server's.
"""
from __future__ import annotations

import re
from typing import Callable

from opd_client.errors import InvalidRequest, NotFound
from opd_client.targets import parse_target

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def parse_teachers(spec: str) -> dict[str, str]:
    """'name=url;name=url' -> {name: url} in order; InvalidRequest on anything malformed."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, eq, url = (x.strip() for x in part.partition("="))
        if not eq or not NAME.match(name):
            raise InvalidRequest("teachers", f"{part!r}: expected NAME=URL with NAME in lower-case letters, "
                                             "digits, '_', '.', '-', e.g. math=grpc://h1:50051,h2:50051")
        if name in out:
            raise InvalidRequest("teachers", f"teacher {name!r} is listed twice")
        parse_target(url)                    # the URL's own errors, at start-up
        out[name] = url
    if not out:
        raise InvalidRequest("teachers", f"{spec!r} names no teacher, e.g. math=grpc://h1:50051")
    return out


class Teachers:
    """name -> client (built by `make(url, name)`), the first name being the default."""

    def __init__(self, urls: dict[str, str], make: Callable[[str, str], object]):
        self.urls = dict(urls)
        self.default = next(iter(self.urls))
        self.clients = {name: make(url, name) for name, url in self.urls.items()}

    def get(self, name: str = ""):
        """The client of teacher `name` ("" = the default), or NotFound naming the known ones."""
        c = self.clients.get(name or self.default)
        if c is None:
            raise NotFound(f"unknown teacher {name!r}: this deployment knows {', '.join(sorted(self.clients))} "
                           "(OPD_TEACHERS on the scorer); name one of them, or add it there")
        return c

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
