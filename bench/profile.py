"""Sampling profiles of the server processes with py-spy, and their summary.

``start`` launches one ``py-spy record --format raw --nonblocking`` per
process (collapsed stacks: ``frame;frame;... count`` a line); ``finish``
waits for them and draws each as an SVG flame graph beside it
(``flamegraph_svg``: one profile, two outputs, no second sampler).
``summarize`` turns a collapsed-stack file into the functions with the
most samples on top of the stack (self) and anywhere on it (inclusive), in
percent of all samples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import html
import os
import re
import shutil
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


def file_stem(role: str) -> str:
    """A role (``edge bench-edge-w0``) as a file name without spaces, for links."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", role)


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
        out = out_dir / f"{file_stem(role)}.txt"
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
            svg = out.with_suffix(".svg")
            svg.write_text(flamegraph_svg(out.read_text(errors="replace"), title=role))
            files[f"{role}_svg"] = str(svg)
    return files


@dataclass(eq=False)
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def flamegraph_svg(text: str, *, title: str = "", width: int = 1200) -> str:
    """A static SVG flame graph of collapsed stacks (root at the bottom; hover
    a box for its function and share of the samples)."""
    root = _Node()
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        root.count += count
        node = root
        for frame in stack.split(";"):
            if frame:
                node = node.children.setdefault(frame_name(frame), _Node())
                node.count += count
    row, top = 16, 28
    boxes: list[tuple[str, float, int, float, int]] = []
    depth_max = 0
    total = max(1, root.count)

    def walk(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        for name, child in sorted(node.children.items()):
            w = width * child.count / total
            if w >= 0.5:
                depth_max = max(depth_max, depth)
                boxes.append((name, x, depth, w, child.count))
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    height = top + (depth_max + 1) * row + 4
    body = []
    for name, x, depth, w, count in boxes:
        y = height - 4 - (depth + 1) * row
        pct = 100.0 * count / total
        # Warm colours, varied by name so neighbours differ.
        hue = 10 + zlib.crc32(name.encode()) % 40
        label = html.escape(name if w > 7 * len(name) else name[: int(w // 7)])
        body.append(
            f"<g><title>{html.escape(name)} ({count} samples, {pct:.1f} %)</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
            f'fill="hsl({hue},85%,60%)"/>'
            f'<text x="{x + 2:.1f}" y="{y + row - 4}">{label}</text></g>'
        )
    head = html.escape(f"{title} — {root.count} samples (py-spy)")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="11">'
        f'<rect width="100%" height="100%" fill="#fff"/>'
        f'<text x="4" y="16" font-size="13">{head}</text>' + "".join(body) + "</svg>\n"
    )


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
