"""TLS overhead: scoring throughput with TLS / without, on R1's workload of bench/scoring.py
(16 clients x 8 sequences x 256 tokens, BENCH_MODEL, `opd serve` as its own process).

    .venv/bin/python bench/tls.py            # ~3-4 min on a 2-core CPU machine

Two teachers run side by side, one plaintext and one with OPD_TLS_CERT (a throwaway CA made
here with `cryptography`); rounds alternate between them (plain, TLS, plain, TLS, ...) so that
load from other jobs falls on both alike. Prints tokens/s per surface and the ratio, held to
>= 0.95.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from opd_client import TLS, AsyncTeacherClient, Sequence
from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
from opd_services.teacher.process import TeacherProcess
from verdict import verdict    # bench/verdict.py (a script's own folder is first on sys.path)


CACHE = Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache/opd"))


def throwaway_pki(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a server certificate for 127.0.0.1."""
    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject, issuer, pub, key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-ca")])
    srv_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-teacher")])
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(cert(ca_name, ca_name, ca_key.public_key(), ca_key, True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert(srv_name, ca_name, srv_key.public_key(), ca_key, False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def r1_requests() -> list[list[np.ndarray]]:
    """R1 of bench/scoring.py: 16 clients, each 8 sequences of 256 tokens."""
    out = []
    for seed in range(16):
        rng = np.random.default_rng(seed)
        out.append([rng.integers(0, BENCH_MODEL.vocab_size, 256).astype(np.int64) for _ in range(8)])
    return out


async def rate(url: str, tls: TLS | None, requests, rounds: int) -> tuple[int, float]:
    """(tokens scored, seconds): one fresh client per R1 client (connection and handshake included)."""
    t0 = time.perf_counter()
    clients = [AsyncTeacherClient(url, tls=tls) for _ in requests]

    async def one(c, req):
        n = 0
        for _ in range(rounds):
            n += (await c.score([Sequence(token_ids=s) for s in req])).usage.scored_tokens
        return n

    try:
        n = sum(await asyncio.gather(*(one(c, r) for c, r in zip(clients, requests))))
        return n, time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per measurement")
    ap.add_argument("--reps", type=int, default=3, help="alternating measurements per mode and surface")
    args = ap.parse_args()
    model = str(cached_random_llama(CACHE, BENCH_MODEL, prefix="bench"))
    reqs = r1_requests()
    with tempfile.TemporaryDirectory() as d:
        ca, cert, key = throwaway_pki(Path(d))
        with TeacherProcess(OPD_MODEL=model) as plain, \
             TeacherProcess(tls_ca=str(ca), OPD_MODEL=model, OPD_TLS_CERT=str(cert), OPD_TLS_KEY=str(key)) as tls:
            tls_opts = TLS(ca=ca)
            for url, opts in ((plain.grpc_url, None), (tls.grpc_url, tls_opts)):      # warm-up
                asyncio.run(rate(url, opts, reqs[:2], 1))
            totals = {}
            for rep in range(args.reps):
                for surface in ("grpc", "http"):
                    for mode, t, opts in (("plain", plain, None), ("tls", tls, tls_opts)):
                        n, s = asyncio.run(rate(getattr(t, f"{surface}_url"), opts, reqs, args.rounds))
                        tn, ts = totals.get((surface, mode), (0, 0.0))
                        totals[(surface, mode)] = (tn + n, ts + s)
                        print(f"rep {rep} {surface:<4} {mode:<5} {n / s:8.0f} tok/s")
    print(f"\nR1 workload (16 clients x 8 x 256 tokens), {args.reps} alternating reps x {args.rounds} rounds")
    for surface in ("grpc", "http"):
        p, t = (totals[(surface, m)][0] / totals[(surface, m)][1] for m in ("plain", "tls"))
        ratio = t / p
        print(f"{surface:<4} plaintext {p:8.0f} tok/s | TLS {t:8.0f} tok/s | TLS / plaintext {ratio:6.3f}  "
              f"{verdict(ratio, 0.95)}")


if __name__ == "__main__":
    main()
