"""The teacher: the core (ScoringService, batcher) between engines/ (what scores) and surfaces/
(who speaks to it); server.py wires the core to its surfaces."""
