"""Sampling profiles of the server processes with py-spy, and their summary.

``start`` launches one ``py-spy record --format raw --nonblocking`` per
process (collapsed stacks: ``frame;frame;... count`` a line); ``finish``
waits for them. ``summarize`` turns a collapsed-stack file into the
functions with the most samples on top of the stack (self) and anywhere on
it (inclusive), in percent of all samples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


async def start(
    pids: Mapping[str, int], out_dir: Path, seconds: float
) -> list[tuple[str, Path, asyncio.subprocess.Process]]:
    """Begin recording every process (Redis excepted); returns handles for ``finish``."""
    exe = py_spy()
    if exe is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    handles: list[tuple[str, Path, asyncio.subprocess.Process]] = []
    for role, pid in pids.items():
        if role == "redis":
            continue
        out = out_dir / f"{role}.txt"
        cmd = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100"]
        cmd += ["--format", "raw", "--nonblocking", "-o", str(out)]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        handles.append((role, out, proc))
    return handles


async def finish(handles: list[tuple[str, Path, asyncio.subprocess.Process]]) -> dict[str, str]:
    files: dict[str, str] = {}
    for role, out, proc in handles:
        try:
            await asyncio.wait_for(proc.wait(), 120)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if out.exists():
            files[role] = str(out)
    return files


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``module.py:func``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file").rsplit("/", 1)[-1]
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            file = path.split(marker, 1)[1]
            break
    return f"{file}:{m.group('func')}"


# Entry frames present in nearly every sample; they say nothing in an inclusive table.
_ENTRY = {
    "runners.py:run",
    "runners.py:Runner.run",
    "__main__.py:<module>",
    "__main__.py:main",
    "server.py:main",
    "threading.py:Thread._bootstrap",
    "threading.py:Thread._bootstrap_inner",
    "base_events.py:BaseEventLoop.run_forever",
    "base_events.py:BaseEventLoop.run_until_complete",
    "base_events.py:BaseEventLoop._run_once",
}


def summarize(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares of a collapsed-stack profile."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        own[leaf] += count
        for name in set(frames):
            if name not in _ENTRY and not name.startswith("<frozen"):
                incl[name] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * c / total, 1)) for name, c in counter.most_common(top)]

    return {"samples": total, "self": share(own), "inclusive": share(incl)}
