"""The one error hierarchy of OPD Teacher, shared by the client and the services.

Every error is an `OPDError`; each also inherits the matching builtin, so callers that
know nothing of OPD can still catch `ValueError`, `ConnectionError`, and so on. This module
only defines errors; mapping them to HTTP status codes and gRPC codes happens once per
surface (see `opd_services.teacher.surfaces.http` and `.grpc`).
"""
from __future__ import annotations


class OPDError(Exception):
    """Base of every OPD Teacher error."""

    code = "internal"

    def __init__(self, message: str, *, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def to_dict(self) -> dict:
        d = {"code": self.code, "message": self.message}
        if self.request_id:
            d["request_id"] = self.request_id
        return d


class InvalidRequest(OPDError, ValueError):
    """The request is malformed or out of range: `field` says where, `reason` says why."""

    code = "invalid_argument"

    def __init__(self, field: str, reason: str, **kw):
        super().__init__(f"{field}: {reason}", **kw)
        self.field = field
        self.reason = reason

    def to_dict(self) -> dict:
        return {**super().to_dict(), "field": self.field, "reason": self.reason}


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than the server accepts; it was not parsed."""

    code = "payload_too_large"


class Unauthenticated(OPDError, PermissionError):
    code = "unauthenticated"


class PermissionDenied(OPDError, PermissionError):
    code = "permission_denied"


class NotFound(OPDError, LookupError):
    """The thing named does not exist here, e.g. a teacher this deployment does not serve."""

    code = "not_found"


class ResourceExhausted(OPDError, RuntimeError):
    """Over a quota or overloaded; retry after `retry_after` seconds. On the client side it is
    what the server sent (Retry-After header or trailer), None when the server sent none."""

    code = "resource_exhausted"

    def __init__(self, message: str, *, retry_after: float | None = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class QueueFull(ResourceExhausted):
    """An experiment's rollout backlog is at its limit."""

    code = "queue_full"


class Unavailable(OPDError, ConnectionError):
    """The service is not ready, draining, or cannot be reached."""

    code = "unavailable"


class DeadlineExceeded(Unavailable, TimeoutError):
    """No answer within the deadline (the client's `timeout`: an HTTP timeout, a gRPC deadline);
    the message names it in seconds. An `Unavailable`, so it is retried like one and caught like
    one, and a builtin `TimeoutError`."""

    code = "deadline_exceeded"


class ConfigError(OPDError, ValueError):
    """A setting has a bad value; raised at start-up, before anything is served."""

    code = "config_error"


class InternalError(OPDError, RuntimeError):
    code = "internal"


BY_CODE: dict[str, type[OPDError]] = {
    cls.code: cls
    for cls in (InvalidRequest, PayloadTooLarge, Unauthenticated, PermissionDenied, NotFound,
                ResourceExhausted, QueueFull, Unavailable, DeadlineExceeded, ConfigError, InternalError)
}
