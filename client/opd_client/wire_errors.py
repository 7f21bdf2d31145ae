"""Wire failures -> OPDError: the client's inverse of the server's one error mapping (HTTP
status and error body, gRPC status and trailers), and the messages a caller gets when the
teacher cannot be reached, timed out or presented an untrusted certificate. Used by client.py."""
from __future__ import annotations

import grpc
import httpx
import orjson

from opd_client.errors import (BY_CODE, DeadlineExceeded, InternalError, InvalidRequest, NotFound, OPDError,
                               PayloadTooLarge, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable)

RETRY_HTTP_STATUS = {502, 503, 504}
HTTP_TIMEOUTS = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)   # ConnectTimeout: unreachable


def unreachable(url: str, attempts: int, err: Exception) -> Unavailable:
    return Unavailable(
        f"cannot reach the OPD teacher at {url} after {attempts} attempt(s): {err}. "
        "Check that `opd serve` is running and ready (GET /readyz), that OPD_TEACHER_URL points "
        "at it (http://HOST:8000 or grpc://HOST:50051, several replicas comma-separated), and "
        "that the port is open from here. " + (
            "A teacher with mutual TLS (OPD_TLS_CLIENT_CA) refuses clients without a certificate it trusts: "
            "pass TLS(cert=..., key=...) / OPD_TLS_CLIENT_CERT and OPD_TLS_CLIENT_KEY."
            if url.startswith(("https", "grpcs")) else
            "A teacher that serves TLS (OPD_TLS_CERT) needs https:// or grpcs://."))


def timed_out(url: str, attempts: int, timeout: float, err: DeadlineExceeded) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the OPD teacher at {url} did not answer within the {timeout:g} s deadline (the client's timeout) "
        f"after {attempts} attempt(s), the last one timing out: {err}. A busy teacher or a large request "
        "needs longer: pass a larger timeout= to the client, or send fewer sequences per request.",
        request_id=err.request_id)


def tls_refused(url: str, err: Exception) -> Exception | None:
    """A TLS verification failure never heals by retrying: say so at once, with the fix."""
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text.lower():
        return Unavailable(f"TLS: the teacher at {url} presented a certificate that the CA bundle does not "
                           f"trust ({text[:300]}). Pass TLS(ca=...) / OPD_TLS_CA with the CA that signed it.")
    return None


def retry_after(value: str | None) -> float | None:
    """The server's Retry-After (header or trailer) in seconds; None when it sent none (or a date)."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def http_error(resp: httpx.Response) -> OPDError:
    try:
        err = resp.json().get("error", {})
    except ValueError:
        err = {}
    msg = err.get("message") or resp.text[:500] or f"HTTP {resp.status_code}"
    rid = err.get("request_id")
    if resp.status_code in (413, 422, 400):
        cls = PayloadTooLarge if resp.status_code == 413 else InvalidRequest
        return cls(err.get("field", "request"), err.get("reason", msg), request_id=rid)
    if resp.status_code == 429:
        return ResourceExhausted(msg, retry_after=retry_after(resp.headers.get("retry-after")), request_id=rid)
    cls = {401: Unauthenticated, 403: PermissionDenied, 404: NotFound, 503: Unavailable}.get(resp.status_code)
    cls = cls or BY_CODE.get(err.get("code", ""), InternalError)
    if issubclass(cls, InvalidRequest):
        cls = InternalError
    return cls(msg, request_id=rid)


def grpc_error(e: grpc.RpcError, timeout: float) -> OPDError:
    code, details = e.code(), e.details() or ""
    md = {k: v for k, v in (e.trailing_metadata() or ())}
    rid = md.get("opd-request-id")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(md.get("opd-field", "request"), md.get("opd-reason", details), request_id=rid)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details, retry_after=retry_after(md.get("retry-after")), request_id=rid)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"DEADLINE_EXCEEDED: no answer within the {timeout:g} s deadline ({details})",
                                request_id=rid)
    cls = {grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
           grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
           grpc.StatusCode.NOT_FOUND: NotFound,
           grpc.StatusCode.UNAVAILABLE: Unavailable}.get(code, InternalError)
    return cls(f"{code.name}: {details}", request_id=rid)


def classify(e: Exception, timeout: float) -> Exception:
    if isinstance(e, grpc.RpcError):
        return grpc_error(e, timeout)
    if isinstance(e, httpx.HTTPStatusError):
        return http_error(e.response)
    if isinstance(e, HTTP_TIMEOUTS):
        return DeadlineExceeded(f"{type(e).__name__}: no answer within the {timeout:g} s timeout ({e})")
    return e


def raise_http(r: httpx.Response):
    if r.status_code >= 400:
        raise http_error(r) if r.status_code not in RETRY_HTTP_STATUS else Unavailable(r.text[:300])
    return orjson.loads(r.content)
