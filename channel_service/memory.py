"""Giving freed memory back to the operating system.

CPython's small-object allocator returns an arena to the system only when
every object in it is gone, and glibc's ``free`` keeps freed chunks in the
process for reuse; either way, memory a shard frees by hibernating channels
can stay in its RSS, which is what a pod is billed and limited on. The
lifecycle lays hibernation out so that a hibernated channel leaves nothing
behind in the memory its state was allocated in (see
``channel_service.lifecycle``), so whole arenas empty out; ``trim`` then asks
glibc (``malloc_trim``) to hand back the free pages of its heaps too.

Where glibc is not the C library (musl, macOS) ``trim`` does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger("channel.memory")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the free pages of every malloc heap to the system; False when unsupported."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class Trimmer:
    """Calls ``trim`` after memory was freed, at most once per ``min_interval``."""

    def __init__(self, min_interval: float = 1.0, on_trim: Callable[[float], None] | None = None):
        self.min_interval = min_interval
        self._on_trim = on_trim
        self._last = -float("inf")
        self._handle: asyncio.TimerHandle | None = None

    def freed(self) -> None:
        """Memory was just freed: trim now, or once the interval since the last trim is over."""
        if self._handle is not None:
            return
        wait = self._last + self.min_interval - time.monotonic()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, wait), self._run)

    def _run(self) -> None:
        self._handle = None
        started = time.perf_counter()
        if trim() and self._on_trim is not None:
            self._on_trim(time.perf_counter() - started)
        self._last = time.monotonic()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
