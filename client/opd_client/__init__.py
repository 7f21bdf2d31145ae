"""opd-client: what every trainer installs to talk to the OPD Teacher service."""
from opd_client.client import NO_RETRY, AsyncTeacherClient, RetryPolicy, TeacherClient
from opd_client.errors import (ConfigError, DeadlineExceeded, InternalError, InvalidRequest, NotFound, OPDError, PayloadTooLarge,
                               PermissionDenied, QueueFull, ResourceExhausted, Unauthenticated,
                               Unavailable)
from opd_client.tls import TLS
from opd_client.tokenizer_id import tokenizer_fingerprint
from opd_client.types import (GenerateResponse, GenerateUsage, Generation, ModelInfo, Rollout, ScoredRollout,
                              ScoreResponse, Sequence, SequenceScores, TokenizerInfo, Usage)

__all__ = [
    "AsyncTeacherClient", "TeacherClient", "RetryPolicy", "NO_RETRY", "TLS", "Sequence", "SequenceScores", "ScoreResponse",
    "ModelInfo", "TokenizerInfo", "tokenizer_fingerprint", "Usage", "Rollout", "ScoredRollout", "Generation", "GenerateResponse", "GenerateUsage",
    "OPDError", "InvalidRequest", "PayloadTooLarge", "Unauthenticated",
    "PermissionDenied", "NotFound", "ResourceExhausted", "QueueFull", "Unavailable", "DeadlineExceeded", "ConfigError", "InternalError",
]
