"""The reference OPD trainer (`opd train`): student sampling, teacher scores via the queue or
directly, OPD losses, held-out evaluation, checkpoints, metrics."""
