"""HeapWatch: malloc's heap is walked at most once per interval; RSS is read every time."""

from __future__ import annotations

import pytest

from bios.server.engine.memory import HeapWatch, host_memory

pytestmark = pytest.mark.skipif(host_memory().heap_in_use_mib is None,
                                reason="no glibc mallinfo2 here")


def _grow_heap() -> list[bytearray]:
    # Many 64 KiB blocks: below glibc's mmap threshold, so they live in the heap.
    return [bytearray(64 * 1024) for _ in range(1024)]  # 64 MiB


def test_heap_figures_are_reused_within_the_interval() -> None:
    watch = HeapWatch(trim_free_mib=None, interval_s=3600)
    first = watch.after_work()
    held = _grow_heap()
    big = bytearray(256 * 1024 * 1024)  # one block above any mmap threshold: fresh pages
    again = watch.after_work()
    assert again.heap_in_use_mib == first.heap_in_use_mib  # not walked again
    assert again.rss_mib is not None and first.rss_mib is not None
    assert again.rss_mib > first.rss_mib + 200  # RSS is read every time
    del held, big


def test_heap_is_read_again_once_the_interval_has_passed() -> None:
    watch = HeapWatch(trim_free_mib=None, interval_s=0.0)
    first = watch.after_work()
    held = _grow_heap()
    again = watch.after_work()
    assert first.heap_in_use_mib is not None and again.heap_in_use_mib is not None
    assert again.heap_in_use_mib > first.heap_in_use_mib + 32
    del held


def test_a_due_reading_trims_free_heap() -> None:
    held = _grow_heap()
    del held[::2]  # 32 MiB of free chunks between live ones: free() cannot return them
    before = host_memory()
    assert before.heap_free_mib is not None and before.heap_free_mib > 24
    HeapWatch(trim_free_mib=16, interval_s=0.0).after_work()
    after = host_memory()
    assert after.rss_mib is not None and before.rss_mib is not None
    assert after.rss_mib < before.rss_mib - 16  # malloc_trim gave their pages back
    del held
