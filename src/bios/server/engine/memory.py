"""Host memory of the engine process: what it holds, and when freed memory goes back to the OS.

A training pass allocates and frees hundreds of MiB of activations and logits. Two glibc
malloc defaults work against that pattern, in opposite directions:

- Blocks above a dynamic threshold (from 128 KiB) are mapped fresh from the OS and unmapped on
  free, so every pass faults their pages in again. An 8-run pass of 512 tokens on the tiny
  model took ~24k minor faults (~100 MiB of zeroed pages) this way, and ran 15-20% slower than
  with the pages reused (2-core EPYC). `HeapWatch` therefore sets the threshold to its 32 MiB
  maximum and keeps freed heap while the engine works (`keep_heap_while_busy`).
- Kept free, tensors of many sizes fragment the heap, and the process's resident size creeps
  up to a high-water mark far above what it uses (seen as slow RSS growth under load). So when
  the engine falls idle, `HeapWatch.when_idle` asks malloc how much heap is free and, past a
  threshold, calls `malloc_trim(0)` to return those pages. Under sustained load it also trims,
  but at most every 10 s: a trim makes the next pass fault the pages back in (72-85k minor
  faults, when it ran every second), and without any, a server that never idled grew ~100 MiB
  a minute.

On platforms without glibc the stats read as unknown and these calls do nothing.

`mallinfo2` and `malloc_trim` walk every free chunk of every arena, so their cost grows with
the heap and its fragmentation: about 70 ms for `mallinfo2` on a fragmented 6.7 GiB heap
(measured), and a few ms in a server holding a hundred runs, where a small step's whole cycle
takes 5-50 ms.
`HeapWatch` therefore reads at most once per interval after work, and trims when idle or,
under sustained load, at most every 10 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass

_MIB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    # struct mallinfo2 (glibc >= 2.33); every field is a size_t.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None
    return libc


_LIBC = _load_libc()

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MIB = 32  # glibc's largest allowed on 64-bit: bigger blocks are always mapped
TRIM_THRESHOLD_MIB = 1024  # free() returns the heap's top to the OS only past this much


def keep_heap_while_busy() -> bool:
    """Have malloc serve blocks up to 32 MiB from its heap and keep up to 1 GiB of freed heap
    (process-wide), so pass after pass reuses pages instead of faulting them in. Fixing the
    thresholds also turns off glibc's own adjustment of them. Returns whether both were set."""
    if _LIBC is None:
        return False
    mmap = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MIB * _MIB)
    trim = _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_MIB * _MIB)
    return bool(mmap and trim)


@dataclass(frozen=True)
class HostMemory:
    """Resident size of the process and, with glibc, malloc's heap in use and free (MiB).

    heap_* cover the main and thread arenas; blocks that malloc mapped directly (large ones)
    are not in them: those go back to the OS as soon as they are freed.
    """

    rss_mib: float | None
    heap_in_use_mib: float | None
    heap_free_mib: float | None


def resident_mib() -> float | None:
    """This process's resident set size in MiB (Linux), or None where /proc is missing."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / _MIB


def host_memory() -> HostMemory:
    """Read the process's memory now: one /proc read and one mallinfo2 call (which walks the
    heap; see the module docstring)."""
    rss = resident_mib()
    if _LIBC is None:
        return HostMemory(rss, None, None)
    info = _LIBC.mallinfo2()
    return HostMemory(rss, info.uordblks / _MIB, info.fordblks / _MIB)


def release_free_memory(min_free_mib: float, heap_free_mib: float | None) -> bool:
    """Return malloc's free heap pages to the OS when a reading just taken
    (`host_memory().heap_free_mib`) shows more than `min_free_mib` MiB free.

    Returns whether a trim ran; a trim walks the heap and costs a few milliseconds per GiB,
    so the threshold keeps it off small cycles.
    """
    if _LIBC is None or heap_free_mib is None:
        return False
    if heap_free_mib < min_free_mib:
        return False
    _LIBC.malloc_trim(0)
    return True


class HeapWatch:
    """The engine's memory: a reading after each piece of work, with malloc's figures refreshed
    at most every `interval_s` seconds; a trim when the engine falls idle, and under sustained
    load at most every `busy_trim_s` seconds.

    Creating one calls `keep_heap_while_busy` (once is enough; it is process-wide).

    Args:
        trim_free_mib: trim when malloc holds more free heap than this (MiB); None never trims.
        interval_s: the least time between two `mallinfo2` walks of the heap after work.
        busy_trim_s: the least time between two trims while work keeps coming. Each such trim
            makes the next pass fault its memory back in, so it is rare; without it a server
            that never idles grew by ~100 MiB a minute (bench/load.py).
    """

    def __init__(self, trim_free_mib: float | None, interval_s: float = 1.0,
                 busy_trim_s: float = 10.0) -> None:
        self.trim_free_mib = trim_free_mib
        self.interval_s = interval_s
        self.busy_trim_s = busy_trim_s
        self._last = HostMemory(None, None, None)
        self._read_at = float("-inf")
        self._trimmed_at = time.monotonic()
        keep_heap_while_busy()

    def after_work(self) -> HostMemory:
        """RSS now; heap in use and free as of the latest walk, taken now when due (before
        any trim, so a cycle's own high-water mark shows)."""
        now = time.monotonic()
        if now - self._read_at < self.interval_s:
            return HostMemory(resident_mib(), self._last.heap_in_use_mib,
                              self._last.heap_free_mib)
        self._read_at = now
        self._last = host_memory()
        if now - self._trimmed_at >= self.busy_trim_s:
            self._trim(self._last.heap_free_mib)
        return self._last

    def when_idle(self) -> bool:
        """The engine has no work: return free heap to the OS if there is more than
        `trim_free_mib` of it. Walks the heap; returns whether a trim ran."""
        if self.trim_free_mib is None or _LIBC is None:
            return False
        return self._trim(host_memory().heap_free_mib)

    def _trim(self, heap_free_mib: float | None) -> bool:
        if self.trim_free_mib is None:
            return False
        trimmed = release_free_memory(self.trim_free_mib, heap_free_mib)
        if trimmed:
            self._trimmed_at = time.monotonic()
        return trimmed
