"""Giving freed memory back to the operating system.

Memory a shard frees by hibernating channels must leave its RSS, which is
what a pod is billed and limited on. A page goes back only when nothing at
all lives on it, so the enemy is a few long-lived objects scattered over
the pages of 5,000 freed channels. Three allocators keep such stragglers:

* CPython's own carves small objects out of 1 MiB arenas. The shard runs
  with ``PYTHONMALLOC=malloc`` (``use_system_malloc``, called before
  anything is imported): every object comes from glibc, and after a
  hibernation sweep ``Trimmer`` runs a full garbage collection (which also
  empties the interpreter's free lists) and ``malloc_trim``, which hands
  back every free 4 KiB page of glibc's heaps.
* glibc's per-thread cache keeps up to 7 freed chunks of each of 64 sizes
  per thread for reuse, and ``malloc_trim`` does not empty it: measured,
  about 1,000 such chunks, each on a page of its own, kept 4 MB resident
  after 5,000 channels slept. ``use_system_malloc`` turns it off
  (``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``; the fast bins it sits
  in front of stay, and the trim consolidates them).
* Free lists no collection empties: CPython's ``_asyncio`` keeps up to 255
  spent ``await future`` iterators, uvloop up to 250 ``Handle`` and 250
  ``TimerHandle`` objects. After a busy period they hold objects of that
  period, about one per page (2 MB). ``FreeListBallast`` keeps as many
  iterators and handles made at start-up; after a sweep it takes whatever
  the lists hold, gives its own back in their place (the lists are then
  full) and lets the taken ones go, so they are freed for real; then it
  takes its own back out of the lists. Timer handles are left alone: one
  taken back out of its list makes a new float (its deadline), which lands
  on a freed page just as the handle it spared would have stayed on one.

Sleeping channels themselves live in one buffer (``channel_service.dormant``),
not among the freed objects. An operator who sets ``PYTHONMALLOC`` keeps
their choice (and glibc's cache); one who sets ``GLIBC_TUNABLES`` keeps
theirs.

Where glibc is not the C library (musl, macOS) none of this applies.
"""

from __future__ import annotations

import asyncio
import contextvars
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
    """Re-execute this process with ``PYTHONMALLOC=malloc`` (and glibc's
    per-thread cache off) unless ``PYTHONMALLOC`` is set (the environment
    then says what to use). Call it first thing in ``__main__``: nothing
    started before it survives the exec."""
    if "PYTHONMALLOC" in os.environ or _TRIM is None:
        return
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    os.execve(sys.executable, sys.orig_argv, env)


def trim() -> bool:
    """Return the free pages of every malloc heap to the system; False when unsupported."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


FUTURE_ITERS = 255
"""Spent ``await future`` iterators CPython's ``_asyncio`` keeps (``FI_FREELIST_MAXLEN``)."""
UVLOOP_HANDLES = 250
"""``Handle`` objects uvloop keeps (``DEFAULT_FREELIST_SIZE``)."""
SETTLE_SECONDS = 0.05
"""From a swap to taking the ballast back: by then the loop has dropped the
taken handles (they wait one turn in its ready queue)."""


def _noop() -> None:
    pass


class FreeListBallast:
    """Objects made at start-up that stand in for the loop's busiest small
    objects in their free lists after a sweep (see the module doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future = loop.create_future()
        self._context = contextvars.Context()
        self._uvloop = type(loop).__module__.startswith("uvloop")
        self._held = self._take()

    def _take(self) -> list[object]:
        """As many objects of each type as its free list holds at most: those
        in the list first, made new for the rest."""
        taken: list[object] = [self._future.__await__() for _ in range(FUTURE_ITERS)]
        if self._uvloop:
            for _ in range(UVLOOP_HANDLES):
                # One shared context: a handle copies the current one otherwise.
                handle = self._loop.call_soon(_noop, context=self._context)
                handle.cancel()
                taken.append(handle)
        return taken

    def swap(self) -> None:
        """Take what the free lists hold, put the ballast in its place; the
        taken objects are freed once the loop lets go of them. Call
        ``settle`` ``SETTLE_SECONDS`` later."""
        taken = self._take()
        self._held = []  # into the free lists, which the take emptied
        del taken  # the lists are full: these go back to the C library

    def settle(self) -> None:
        """Take the ballast back out of the free lists."""
        self._held = self._take()


class Trimmer:
    """Calls ``trim`` after memory was freed, at most once per ``min_interval``."""

    def __init__(self, min_interval: float = 1.0, on_trim: Callable[[float], None] | None = None):
        self.min_interval = min_interval
        self._on_trim = on_trim
        self._last = -float("inf")
        self._handle: asyncio.TimerHandle | None = None
        self._ballast: FreeListBallast | None = None

    def start(self) -> None:
        """Make the free-list ballast now, before the traffic (in the running loop)."""
        if self._ballast is None and _TRIM is not None:
            self._ballast = FreeListBallast(asyncio.get_running_loop())

    def freed(self) -> None:
        """Memory was just freed: trim now, or once the interval since the last trim is over."""
        if self._handle is not None:
            return
        wait = self._last + self.min_interval - time.monotonic()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, wait), self._swap)

    def _swap(self) -> None:
        if self._ballast is None:
            self._run()
            return
        self._ballast.swap()
        self._handle = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._run)

    def _run(self) -> None:
        self._handle = None
        started = time.perf_counter()
        if self._ballast is not None:
            self._ballast.settle()
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
