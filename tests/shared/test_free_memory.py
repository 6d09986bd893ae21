"""shared.app.FreeMemoryReturner: glibc's free memory handed back to the OS, at most once per
interval (a fake monotonic clock moves time; the memory figures are the process's own RSS)."""

from __future__ import annotations

import platform

import pytest

from shared.app import FreeMemoryReturner

GLIBC = platform.libc_ver()[0] == "glibc"


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; elsewhere the returner does nothing by design")
def test_it_asks_at_most_once_per_interval() -> None:
    now = [100.0]
    returner = FreeMemoryReturner(interval_s=0.25, monotonic=lambda: now[0])
    assert returner() is True
    now[0] = 100.125
    assert returner() is False
    now[0] = 100.25
    assert returner() is True
    assert returner() is False


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; elsewhere the returner does nothing by design")
def test_memory_freed_below_live_blocks_goes_back_to_the_os() -> None:
    # Blocks over 512 bytes come from malloc; the ones allocated last stay alive, so the freed
    # ones below them cannot be given back by trimming the top of the heap: only malloc_trim can.
    blocks = [bytearray(4000) for _ in range(30_000)]  # ~120 MB
    kept = blocks[-3_000:]
    del blocks
    held = _rss_mb()
    assert FreeMemoryReturner()() is True
    returned = held - _rss_mb()
    assert returned > 50, f"only {returned:.1f} MB went back to the OS"
    assert len(kept) == 3_000
