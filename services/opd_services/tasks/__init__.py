"""Synthetic tasks and the builders of the checkpoints our own code makes (no hub downloads)."""
