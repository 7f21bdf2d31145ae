"""The teacher: engines, the batcher, ScoringService, and its HTTP and gRPC surfaces."""
