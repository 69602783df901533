"""glibc's allocator kept from hoarding freed memory: arenas capped, free pages handed back.

Training and mapping from a store allocate and free large buffers all the time (decoded chunks,
windows, batches) from two threads. glibc keeps what they free for reuse: in one arena per thread
(capped here at two) and, as the freed blocks lie between live ones, in pieces that the heap's top
trim never reaches. Over an epoch that cost grew with the run's length, so with the atlas's size:
training 200k cells peaked at 990 MiB against 817 at 20k (1.0 KB per cell, issue 12), with the
allocator holding ~470 MiB more than the live heap at the end (measured with memray).
:func:`release_free_memory` (``malloc_trim``) hands the free pages of every arena back to the
system; training calls it between its phases. The loader called it before reading each window until
windows were read into reused buffers (:mod:`atlasdgd.data.window`): the pages it handed back faulted
in again with the next window, ~40% of the loader's time (measured).

Measured alternatives: a fixed ``M_MMAP_THRESHOLD`` of 256 KiB (every large buffer its own
mapping) reached a lower peak (701 / 782 MiB at 20k / 200k cells) but made the candidate search
1.5-2x slower (a page fault per 4 KiB of every fresh buffer); 1-4 MiB thresholds sat in between on
both counts.
"""

from __future__ import annotations

import os
import sys
from functools import cache


@cache
def _libc():
    """glibc through ctypes, or None (other platforms and C libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (musl has no malloc_trim)
        return libc
    except (OSError, AttributeError):
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter number
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas (called on ``import atlasdgd``, before any of our threads start);
    returns whether a cap was set. Every thread that allocates gets an arena of its own (up to 8 per core), and each keeps
    the large buffers it freed (decoded chunks, windows, batches) for reuse: training 200k cells from a
    store peaked at 1,883 MiB with the default, 1,294 MiB with 2 arenas, same speed (measured). A
    thread takes its arena at its first allocation, so only threads that allocate afterwards are
    capped (called later, when the loader starts, it saved nothing: the PCA start's reads had
    already started zarrs' threads). Override: set ``MALLOC_ARENA_MAX`` yourself (it is kept), or
    ``ATLASDGD_MALLOC_ARENAS=default`` to leave glibc's own default. A no-op off glibc."""
    if os.environ.get("MALLOC_ARENA_MAX") or os.environ.get("ATLASDGD_MALLOC_ARENAS", "").lower() == "default":
        return False
    libc = _libc()
    return bool(libc.mallopt(M_ARENA_MAX, int(arenas))) if libc is not None else False


def release_free_memory() -> bool:
    """Hand the free pages of every malloc arena back to the system (glibc's ``malloc_trim(0)``);
    returns whether anything was released. A no-op off glibc.

    The call costs 1-2 ms with a 1 GiB heap (50 ms the first time, with 1.2 GiB of holes; measured;
    ctypes drops the GIL meanwhile, so the loader's thread trims while the trainer computes), but
    the pages it hands back fault in again when reused: hence between phases, not in the loader."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``: one read, ~20 us), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class TrimWhenGrown:
    """:func:`release_free_memory` on the first call, then only when the resident set has grown by
    ``threshold`` bytes over its level one call after the last trim (the working set, pages faulted
    back in included). Called before each window of a loader: in a steady phase (a training epoch)
    that trims once, where a phase that leaves freed blocks between live ones (the held-out
    mapping's search) is trimmed as often as it grows. Trimming every window cost 15-30% of the
    loader's speed in pages faulted in again (measured with reused window buffers; ~40% before them). A no-op where the resident set is unknown."""

    def __init__(self, threshold: int = 16 << 20):
        self.threshold, self.level, self.trimmed = int(threshold), None, False

    def __call__(self) -> bool:
        rss = resident_bytes()
        if rss is None:
            return False
        if not self.trimmed or (self.level is not None and rss > self.level + self.threshold):
            release_free_memory()
            self.trimmed, self.level = True, None
            return True
        if self.level is None:
            self.level = rss
        return False
