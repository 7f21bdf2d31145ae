"""Who speaks to the teacher: native HTTP, gRPC, admin HTTP, and dialects/ (other servers' protocols).

Each surface parses its protocol, calls the one ScoringService, and renders the result. The
mapping of errors, the body limit, request metrics and the tenant dependency live in
`common.py`; no surface imports another. `teacher/server.py` wires them to the core.
"""
