"""Keep broker-message-sized buffers in glibc's heap: one ``mallopt`` per process.

Why: a transfer allocates and frees buffers of about ``max_message_size`` (4 MiB) many times
a second, on both sides (the joined frame, pulsar-client's copy of it, the received payload).
glibc's malloc serves a block that large with a fresh ``mmap`` (the threshold starts at 128 KiB)
and gives it back with ``munmap`` on free; once it has moved the threshold up, it still trims
the heap's free top back to the kernel past a small trim threshold. Either way the next
buffer's pages are faulted in and zeroed again by the kernel: profiled, that was a large part
of the CPU a 256 MiB transfer cost beyond what the raw client spends (docs/benchmarks.md).

What: the mmap threshold goes to ``2 × max_message_size`` (at most 32 MiB, glibc's ceiling on
64-bit) and the trim threshold to 64 MiB, so freed message buffers stay in the heap for the
next one. The price is memory: up to 64 MiB of free heap per malloc arena may stay resident.

It is process-wide (malloc has no per-library setting), so it is applied at most once per
process, and only raised after that (a later session with a bigger ``max_message_size``); never
when the operator tuned malloc (a ``MALLOC_*`` variable or ``GLIBC_TUNABLES`` in the
environment), and never on a C library other than glibc. The Pulsar option
``keep_message_buffers`` (default on) turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

__all__ = ["MMAP_THRESHOLD_CAP", "TRIM_THRESHOLD", "applied_threshold", "keep_message_buffers"]

log = logging.getLogger("fedtransport.allocator")

# mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CAP = 32 << 20  # HEAP_MAX_SIZE / 2 on 64-bit glibc: mallopt refuses more
TRIM_THRESHOLD = 64 << 20

_lock = threading.Lock()
_applied: int | None = None  # the mmap threshold set by this module, once it set one


def _glibc() -> Any | None:
    """The process's C library if it is glibc (which has ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl, or a platform without malloc tuning
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _operator_tuned() -> str | None:
    """The environment variable by which the operator tuned malloc themselves, if any."""
    for name in sorted(os.environ):
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            return name
    return None


def keep_message_buffers(max_message_size: int) -> int | None:
    """Raise glibc's mmap and trim thresholds for buffers of ``max_message_size`` bytes.

    Returns the mmap threshold set by this call, or None when it set nothing: already set
    (as high or higher) earlier in this process, the operator tuned malloc, or not glibc.
    """
    global _applied
    want = min(2 * max_message_size, MMAP_THRESHOLD_CAP)
    with _lock:
        if _applied is not None and _applied >= want:
            return None
        tuned = _operator_tuned()
        if tuned is not None:
            log.debug("malloc left as it is: %s is set", tuned)
            return None
        libc = _glibc()
        if libc is None:
            return None
        # Setting either one also stops glibc from moving them itself as blocks are freed.
        if not libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) or not libc.mallopt(_M_MMAP_THRESHOLD, want):
            log.debug("mallopt refused the thresholds; malloc left as it is")
            return None
        _applied = want
        log.debug("malloc: mmap threshold %d, trim threshold %d bytes", want, TRIM_THRESHOLD)
        return want


def applied_threshold() -> int | None:
    """The mmap threshold this module set in this process, or None if it set none."""
    return _applied
