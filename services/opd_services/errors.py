"""Service-side view of the error hierarchy: the same classes the client raises.

The hierarchy is defined once, in `opd_client.errors` (services depend on the client, never
the reverse). Each surface maps these to its wire codes in exactly one place.
"""
from opd_client.errors import (BY_CODE, ConfigError, InternalError, InvalidRequest, OPDError,  # noqa: F401
                               NotFound, PayloadTooLarge, PermissionDenied, QueueFull, ResourceExhausted,
                               Unauthenticated, Unavailable)
