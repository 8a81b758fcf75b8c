"""Giving memory back: the shard re-executes itself with the C library's
allocator (its per-thread cache off) unless the environment chose one,
trims at most once per interval however many sweeps free memory, and after
a sweep the free lists of the loop's small objects hold start-up objects
instead of the busy period's."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from channel_service import memory

PROGRAM = (
    "from channel_service.memory import use_system_malloc\n"
    "use_system_malloc()\n"
    "import os, sys\n"
    "print(os.environ.get('PYTHONMALLOC'), os.environ.get('GLIBC_TUNABLES'), sys.orig_argv[1:3])\n"
)

needs_glibc = pytest.mark.skipif(not memory.trim(), reason="the C library is not glibc")


def run(env: dict[str, str]) -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES")}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        env={**base, "PYTHONPATH": root, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@needs_glibc
def test_the_shard_re_executes_itself_with_the_system_allocator() -> None:
    # The same program, run again with the variable set (and only once).
    assert run({}) == f"malloc glibc.malloc.tcache_count=0 ['-c', {PROGRAM!r}]"


def test_an_allocator_the_environment_chose_is_kept() -> None:
    assert run({"PYTHONMALLOC": "pymalloc"}).startswith("pymalloc None ")


@needs_glibc
def test_tunables_the_environment_chose_are_kept() -> None:
    out = run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert out.startswith("malloc glibc.malloc.arena_max=2 ")


@needs_glibc
async def test_trims_at_most_once_per_interval() -> None:
    trims: list[float] = []
    trimmed = asyncio.Event()

    def on_trim(seconds: float) -> None:
        trims.append(seconds)
        trimmed.set()

    trimmer = memory.Trimmer(min_interval=0.2, on_trim=on_trim)
    try:
        for _ in range(5):
            trimmer.freed()  # five sweeps in one loop turn: one trim
        async with asyncio.timeout(5):
            await trimmed.wait()
        trimmed.clear()
        trimmer.freed()
        trimmer.freed()
        async with asyncio.timeout(5):
            await trimmed.wait()
        assert len(trims) == 2
    finally:
        trimmer.cancel()


async def busy_period(loop: asyncio.AbstractEventLoop) -> None:
    """Many iterators and handles alive at once, then let go: the free lists
    fill with them."""
    future = loop.create_future()
    held: list[object] = [future.__await__() for _ in range(1000)]
    for _ in range(1000):
        handle = loop.call_soon(memory._noop)
        handle.cancel()
        held.append(handle)
    del held
    await asyncio.sleep(0)  # one loop turn: the ready queue lets go of the handles


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_after_a_sweep_the_free_lists_hold_the_ballast(loop_kind: str) -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ballast = memory.FreeListBallast(loop)
        made_at_start = {id(o) for o in ballast._held}
        await busy_period(loop)
        ballast.swap()
        await asyncio.sleep(memory.SETTLE_SECONDS)
        ballast.settle()
        # The ballast went into the lists ahead of the busy period's objects
        # (which were then freed) and came back out of them.
        back = sum(id(o) in made_at_start for o in ballast._held)
        return back, len(made_at_start)

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        back, made = uvloop.run(main())
        # uvloop: 255 iterators and 250 handles. The loop itself takes a
        # handle from the list while the test waits.
        assert made == memory.FUTURE_ITERS + memory.UVLOOP_HANDLES
        assert back >= made - 2
    else:
        back, made = asyncio.run(main())
        assert (back, made) == (memory.FUTURE_ITERS, memory.FUTURE_ITERS)
