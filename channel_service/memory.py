"""Giving freed memory back to the operating system.

Memory a shard frees by hibernating channels must leave its RSS, which is
what a pod is billed and limited on. CPython's own allocator carves small
objects out of 1 MiB arenas and gives an arena back only when the last
object in it is gone, so a few long-lived objects (a session's, a
metric's, a dict that grew while the shard was busy) scattered over the
arenas of 5,000 freed channels keep most of those megabytes resident. The
shard therefore runs with ``PYTHONMALLOC=malloc`` (``use_system_malloc``,
called before anything is imported): every object comes from glibc, and
after a hibernation sweep ``Trimmer`` runs a full garbage collection (which
also empties the interpreter's free lists) and ``malloc_trim``, which hands
back every free 4 KiB page of glibc's heaps. Sleeping channels themselves
live in one buffer (``channel_service.dormant``), not among the freed
objects. An operator who sets ``PYTHONMALLOC`` keeps their choice.

Where glibc is not the C library (musl, macOS) ``trim`` does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
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


def use_system_malloc() -> None:
    """Re-execute this process with ``PYTHONMALLOC=malloc`` unless the
    variable is set (the environment then says what to use). Call it first
    thing in ``__main__``: nothing started before it survives the exec."""
    if "PYTHONMALLOC" in os.environ or _TRIM is None:
        return
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    os.execve(sys.executable, sys.orig_argv, env)


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
        # A full collection also empties the interpreter's free lists (tuples,
        # lists, dicts, frames kept for reuse): several MB after thousands of
        # channels were freed, which trim can then return.
        gc.collect()
        if trim() and self._on_trim is not None:
            self._on_trim(time.perf_counter() - started)
        self._last = time.monotonic()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
