"""shared.app.FreeMemoryReturner: glibc's free memory handed back to the OS, at most once per
interval (a fake monotonic clock moves time; the memory figures are the process's own RSS)."""

from __future__ import annotations

import platform

from shared.app import FreeMemoryReturner

GLIBC = platform.libc_ver()[0] == "glibc"


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_it_asks_at_most_once_per_interval() -> None:
    now = [100.0]
    returner = FreeMemoryReturner(interval_s=0.25, monotonic=lambda: now[0])
    asked = [returner()]
    now[0] = 100.125
    asked.append(returner())
    now[0] = 100.25
    asked += [returner(), returner()]
    # without glibc (musl, macOS) there is nothing to ask, by design
    assert asked == ([True, False, True, False] if GLIBC else [False] * 4)


def test_memory_freed_below_live_blocks_goes_back_to_the_os() -> None:
    # Blocks over 512 bytes come from malloc; the ones allocated last stay alive, so the freed
    # ones below them cannot be given back by trimming the top of the heap: only malloc_trim can.
    blocks = [bytearray(4000) for _ in range(30_000)]  # ~120 MB
    kept = blocks[-3_000:]
    del blocks
    held = _rss_mb()
    asked = FreeMemoryReturner()()
    returned = held - _rss_mb()
    assert len(kept) == 3_000
    if not GLIBC:  # nothing to ask without glibc, by design
        assert asked is False
        return
    assert asked is True
    assert returned > 50, f"only {returned:.1f} MB went back to the OS"
