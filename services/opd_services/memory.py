"""Process memory: make glibc's malloc reuse freed memory for large blocks.

A scoring forward allocates activations of tens of MB per layer ([tokens, intermediate] float32
is 56 MB for 10k tokens). glibc serves every block over its mmap threshold (at most 32 MB) with a
fresh mmap and unmaps it on free, so each batch page-faults its working set in again: measured
on the 2-core AMD VM (bench/RESULTS.md, "Prefix-shared scoring"), 2.8 GB of page faults per
unshared P4a batch, a quarter of its time in the kernel. `reuse_freed_memory` turns that off for
the process: one arena (every thread's blocks come from the same heap, so a block freed by one
batch serves the next), no mmap for large blocks, no trimming of the heap's top. The cost: the
heap does not shrink, so RSS stays at the peak working set of the largest batch. vLLM's CPU
backend gets the same effect by preloading tcmalloc. Called by `opd serve` at start-up, before
any thread exists (a thread keeps the arena it first used).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse freed memory; False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("malloc: no glibc mallopt here (%s); freed memory is left to the allocator's defaults", name)
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    if not ok:
        log.warning("malloc: mallopt refused a setting; freed memory may still be returned to the OS")
    return ok
