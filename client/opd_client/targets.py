"""Parse a teacher target URL into a `Target`: which transport, which replica addresses.

    http://h:8000                 one HTTP replica
    http://h1:8000,h2:8000        several HTTP replicas: the client spreads requests over them
    grpc://h1:50051,h2:50051      several gRPC replicas: one channel each, spread the same way
    h:50051                       bare host:port means grpc://
    grpc+dns://name:50051         gRPC resolves the name itself (`dns:///name:50051`) and
                                  balances requests over every address with `round_robin`
                                  (a k8s headless Service: one A record per ready pod)
    http+dns://name:8000          the name is resolved here, one replica per address, and
                                  resolved again every `DNS_REFRESH_S` (`resolve`)
    https://, grpcs://, grpcs+dns://   the same with TLS (no https+dns: the replicas would be
                                  dialled by IP, which a certificate for the name does not cover)

This module parses and resolves names only; it opens no connection and keeps no state.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from opd_client.errors import InvalidRequest

DNS_REFRESH_S = 30.0
# scheme -> (transport, resolves a DNS name, TLS)
_SCHEMES = {"http": ("http", False, False), "https": ("http", False, True),
            "grpc": ("grpc", False, False), "grpcs": ("grpc", False, True),
            "http+dns": ("http", True, False),
            "grpc+dns": ("grpc", True, False), "grpcs+dns": ("grpc", True, True)}


@dataclass(frozen=True)
class Target:
    url: str
    transport: str                 # "http" | "grpc"
    scheme: str                    # the URL's scheme, e.g. "http", "grpc+dns"
    addresses: tuple[str, ...]     # http: base URLs; grpc: host:port (grpc+dns: one "dns:///" target)
    dns: bool = False              # the address is a name that stands for many replicas
    secure: bool = False           # TLS (https, grpcs)


def _host_port(url: str, part: str) -> tuple[str, int]:
    p = urlparse(f"x://{part}")
    try:
        port = p.port
    except ValueError:
        port = None
    if not p.hostname or not port:
        raise InvalidRequest("url", f"{url!r}: {part!r} needs a host and a port, e.g. 127.0.0.1:50051")
    return (f"[{p.hostname}]" if ":" in p.hostname else p.hostname), port


def parse_target(url: str) -> Target:
    """A teacher URL -> Target, or InvalidRequest saying what is wrong with it."""
    raw = url if "://" in url else f"grpc://{url}"
    scheme, _, rest = raw.partition("://")
    if scheme not in _SCHEMES:
        raise InvalidRequest("url", f"{url!r}: scheme must be one of {', '.join(_SCHEMES)}")
    transport, dns, secure = _SCHEMES[scheme]
    netloc, _, path = rest.partition("/")
    parts = [p.strip() for p in netloc.split(",")]
    if not netloc or any(not p for p in parts):
        raise InvalidRequest("url", f"{url!r}: no address, or an empty one between commas")
    if dns and len(parts) > 1:
        raise InvalidRequest("url", f"{url!r}: {scheme}:// takes one name (it resolves to the replicas)")
    hosts = [_host_port(url, p) for p in parts]
    if transport == "grpc":
        addrs = tuple(f"dns:///{h}:{p}" if dns else f"{h}:{p}" for h, p in hosts)
    else:
        suffix = f"/{path}".rstrip("/")
        base = "https" if secure else "http"
        addrs = tuple(f"{base}://{h}:{p}{suffix}" for h, p in hosts)
    return Target(url, transport, scheme, addrs, dns, secure)


def resolve(base_url: str) -> list[str]:
    """http+dns: one base URL per address the name resolves to (sorted; the name itself if none)."""
    p = urlparse(base_url)
    try:
        infos = socket.getaddrinfo(p.hostname, p.port, type=socket.SOCK_STREAM)
    except OSError:
        return [base_url]
    ips = sorted({i[4][0] for i in infos})
    path = p.path.rstrip("/")
    return [f"{p.scheme}://{f'[{ip}]' if ':' in ip else ip}:{p.port}{path}" for ip in ips] or [base_url]
