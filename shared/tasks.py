"""Background tasks that must finish their work in hand before the process exits."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_gracefully(task: asyncio.Task[object], timeout_s: float) -> None:
    """Wait for `task` to finish on its own (it was told to stop); cancel it past `timeout_s`.
    Its own failure was already logged by the task, so it is not raised here."""
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    except Exception:  # noqa: S110 - the task logged its own failure
        pass
