"""Process memory: make glibc's malloc reuse freed memory for large blocks.

A scoring forward allocates activations of tens of MB per layer ([tokens, intermediate] float32 is
56 MB for 10k tokens). glibc serves every block over its mmap threshold (at most 32 MB) with a
fresh mmap and unmaps it on free, so each batch page-faults its working set in again: measured on
the 2-core AMD VM (bench/RESULTS.md, "Engine changes behind the P4 figures"), 2.8 GB of page
faults per unshared P4a batch, a quarter of its time in the kernel. `reuse_freed_memory` turns
that off for the process: one arena (every thread's blocks come from the same heap, so a block
freed by one batch serves the next), no mmap for large blocks, no trimming of the heap's top. The
cost: the heap would never shrink after a large batch, so `give_back_free_memory` (the batcher
calls it between batches) returns the heap's free pages to the OS at most once a minute
(malloc_trim): one batch's working set is faulted in again per minute instead of on every batch.
(A 10-minute soak read the same teacher RSS growth with this on and off: bench/RESULTS.md,
"Soak".) vLLM's CPU backend gets the reuse by preloading tcmalloc. `reuse_freed_memory` is called
by `opd serve` at start-up, before any thread exists (a thread keeps the arena it first used).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_EVERY_S = 60.0

_trim = None            # libc's malloc_trim, once reuse_freed_memory() has set the process up
_last_trim = 0.0


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse freed memory; False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        log.info("malloc: no glibc mallopt / malloc_trim here (%s); freed memory is left to the allocator's "
                 "defaults", name)
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    if not ok:
        log.warning("malloc: mallopt refused a setting; freed memory may still be returned to the OS")
        return False
    global _trim, _last_trim
    _trim, _last_trim = trim, time.monotonic()
    return True


def give_back_free_memory(every_s: float = TRIM_EVERY_S) -> bool:
    """Return the heap's free pages to the OS if reuse is on and `every_s` has passed since the
    last time; True when it did."""
    global _last_trim
    now = time.monotonic()
    if _trim is None or now - _last_trim < every_s:
        return False
    _trim(0)
    _last_trim = now
    return True
