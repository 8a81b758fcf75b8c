"""Giving memory back: the shard re-executes itself with the C library's
allocator unless the environment chose one, and trims at most once per
interval however many sweeps free memory."""

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
    "print(os.environ.get('PYTHONMALLOC'), sys.orig_argv[1:3])\n"
)

needs_glibc = pytest.mark.skipif(not memory.trim(), reason="the C library is not glibc")


def run(env: dict[str, str]) -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
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
    assert run({}) == f"malloc ['-c', {PROGRAM!r}]"


def test_an_allocator_the_environment_chose_is_kept() -> None:
    assert run({"PYTHONMALLOC": "pymalloc"}).startswith("pymalloc ")


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
