"""TLS options for talking to the teacher: a CA bundle, and a client certificate for mutual TLS.

    TeacherClient("grpcs://teacher:50051", tls=TLS(ca="ca.pem"))
    TeacherClient("https://teacher:8000", tls=TLS(ca="ca.pem", cert="me.pem", key="me.key"))

`https://` and `grpcs://` turn TLS on; without `ca` the system's trust store is used. The same
PEM files serve both transports. This module builds contexts and credentials only; it opens
no connection, and it never turns certificate verification off.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TLS:
    ca: str | os.PathLike | None = None      # PEM bundle of the CA(s) that sign the teacher's certificate
    cert: str | os.PathLike | None = None    # client certificate (mutual TLS)
    key: str | os.PathLike | None = None     # its private key

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS (httpx `verify=`)."""
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx

    def grpc_credentials(self):
        """For grpcs:// (grpc.ssl_channel_credentials)."""
        import grpc
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert))


def _read(path) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check_pair(cert, key, cert_name: str, key_name: str) -> None:
    """Raise ValueError naming the variable when a PEM file is missing, unreadable, not PEM, or
    (with a key) when the key does not belong to the certificate. With key=None, `cert` is a CA bundle."""
    for name, path in ((cert_name, cert), (key_name, key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name}={str(path)!r}: no such file (mount the certificate Secret or fix the path)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if key is None:
        try:
            ctx.load_verify_locations(cafile=str(cert))
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(f"{cert_name}={str(cert)!r}: not a PEM CA bundle ({e})") from None
        return
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise ValueError(f"{key_name}={str(key)!r}: this private key does not belong to the certificate "
                             f"{cert_name}={str(cert)!r}") from None
        raise ValueError(f"{cert_name}={str(cert)!r} / {key_name}={str(key)!r}: cannot load the PEM certificate "
                         f"and key ({e})") from None
