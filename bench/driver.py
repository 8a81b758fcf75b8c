"""The coordinator's side of the load generator: start worker processes, split
the clients between them, send commands, gather events, show progress.

Receivers of every group are split evenly over the workers; senders all live
in worker 0, which assigns message indices. ``Load.run`` merges the
workers' delivery files into one (index, latency) pair of arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.stats import IntArray


class LoadError(RuntimeError):
    """A worker died or did not answer in time."""


class Progress:
    """One status line on stderr: rewritten in place on a terminal, else every few seconds."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.prefix = ""
        self._last = 0.0
        self._width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        line = f"[{self.prefix}] {text}" if self.prefix else text
        now = time.monotonic()
        if self.tty:
            pad = max(0, self._width - len(line))
            sys.stderr.write("\r" + line + " " * pad)
            sys.stderr.flush()
            self._width = len(line)
        elif force or now - self._last >= 5:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self._last = now

    def done(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * self._width + "\r")
            self._width = 0
        line = f"[{self.prefix}] {text}" if self.prefix else text
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


@dataclass(eq=False)
class WorkerProc:
    index: int
    proc: asyncio.subprocess.Process
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    last_progress: dict[str, Any] = field(default_factory=dict)
    pump: asyncio.Task[None] | None = None
    stderr_tail: list[str] = field(default_factory=list)

    async def next_event(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadError(f"worker {self.index}: no {kind!r} within {timeout:.0f}s")
            try:
                event = await asyncio.wait_for(self.events.get(), left)
            except TimeoutError:
                raise LoadError(f"worker {self.index}: no {kind!r} within {timeout:.0f}s") from None
            if event.get("event") == "exit":
                tail = "\n".join(self.stderr_tail[-20:])
                raise LoadError(f"worker {self.index} exited while waiting for {kind!r}:\n{tail}")
            if event.get("event") == kind:
                return event

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(cmd) + b"\n")


@dataclass(eq=False)
class Load:
    workers: list[WorkerProc]
    progress: Progress
    connected: list[dict[str, Any]] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def status(self) -> dict[str, int]:
        total: dict[str, int] = {"connected": 0, "target": 0, "deliveries": 0, "failures": 0}
        for w in self.workers:
            for key in total:
                total[key] += int(w.last_progress.get(key, 0))
        return total

    async def _watch(self, label: str, done: asyncio.Future[Any]) -> None:
        started = time.monotonic()
        while not done.done():
            s = self.status()
            self.progress.show(
                f"{label}: connected {s['connected']}/{s['target']}, "
                f"deliveries {s['deliveries']}, failures {s['failures']}, "
                f"{time.monotonic() - started:.0f}s"
            )
            await asyncio.sleep(0.5)

    async def _all(self, kind: str, timeout: float, label: str) -> list[dict[str, Any]]:
        gathered = asyncio.ensure_future(
            asyncio.gather(*(w.next_event(kind, timeout) for w in self.workers))
        )
        watcher = asyncio.create_task(self._watch(label, gathered))
        try:
            return list(await gathered)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def wait_connected(self, timeout: float) -> dict[str, Any]:
        events = await self._all("connected", timeout, "connecting")
        self.connected = events
        connect_ms: list[float] = []
        for e in events:
            connect_ms.extend(e["connect_ms"])
        return {
            "connected": sum(e["connected"] for e in events),
            "senders": sum(e["senders"] for e in events),
            "failures": sum(e["failures"] for e in events),
            "retries": sum(e["retries"] for e in events),
            "elapsed_s": max(e["elapsed_s"] for e in events),
            "connect_ms": connect_ms,
            "first_error": next((e["first_error"] for e in events if e["first_error"]), ""),
        }

    async def run(
        self,
        *,
        rate: float,
        duration: float,
        drain: float,
        expected_by_worker: list[int],
        label: str = "running",
        senders: tuple[int, int] | None = None,
        join: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], IntArray, IntArray]:
        """One measured window across every worker; returns (summary, idx, latency_ns).
        ``senders`` (first, count): publish through those senders only; ``join``:
        worker 0 opens that many new connections during the window (a join storm)."""
        for w, expected in zip(self.workers, expected_by_worker, strict=True):
            cmd: dict[str, Any] = {
                "cmd": "run",
                "rate": rate,
                "duration": duration,
                "drain": drain,
                "expected": expected,
            }
            if senders is not None:
                cmd["senders"] = list(senders)
            if join is not None and w.index == 0:
                cmd["join"] = join
            w.send(cmd)
        extra = float(join.get("after", 0) + join.get("within", 0) + 120) if join else 0.0
        events = await self._all("result", duration + drain + 60 + extra, label)
        idx_parts, lat_parts = [], []
        for e in events:
            with np.load(e["file"]) as data:
                idx_parts.append(data["idx"])
                lat_parts.append(data["latency"])
            with contextlib.suppress(OSError):
                os.unlink(e["file"])
        sender = events[0]
        summary = {
            "sent": sender["sent"],
            "send_seconds": sender["send_seconds"],
            "deliveries": sum(e["deliveries"] for e in events),
            "acks": sender["acks"],
            "join": sender.get("join"),
        }
        return (
            summary,
            np.concatenate(idx_parts).astype(np.int64),
            np.concatenate(lat_parts).astype(np.int64),
        )

    async def replay(self, messages: int, rounds: int) -> dict[str, Any]:
        self.workers[0].send({"cmd": "replay", "messages": messages, "rounds": rounds})
        return await self.workers[0].next_event("replay", 120 + rounds * 60)

    async def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.send({"cmd": "close"})
        for w in self.workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
            if w.pump is not None:
                w.pump.cancel()


def split_groups(groups: list[dict[str, Any]], workers: int) -> list[list[dict[str, Any]]]:
    """Split each group's receivers evenly; senders stay in worker 0."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    for group in groups:
        n = int(group.get("receivers", 0))
        for w in range(workers):
            share = n // workers + (1 if w < n % workers else 0)
            part = {**group, "receivers": share}
            if w > 0:
                part["sender"] = False
            if share or part.get("sender"):
                out[w].append(part)
    return out


async def _pump(w: WorkerProc) -> None:
    assert w.proc.stdout is not None and w.proc.stderr is not None

    async def errors() -> None:
        assert w.proc.stderr is not None
        async for raw in w.proc.stderr:
            w.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())
            del w.stderr_tail[:-50]

    err_task = asyncio.create_task(errors())
    try:
        async for raw in w.proc.stdout:
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if event.get("event") == "progress":
                w.last_progress = event
            else:
                await w.events.put(event)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(err_task, 2)
        await w.events.put({"event": "exit"})


@contextlib.asynccontextmanager
async def start_load(
    spec: dict[str, Any], *, workers: int, work_dir: Path, progress: Progress
) -> AsyncIterator[Load]:
    """Start ``workers`` load-generator processes for ``spec`` (groups split between them)."""
    os.makedirs(work_dir, exist_ok=True)
    parts = split_groups(spec["groups"], workers)
    procs: list[WorkerProc] = []
    try:
        for i, groups in enumerate(parts):
            path = work_dir / f"spec-{i}.json"
            path.write_bytes(
                orjson.dumps({**spec, "groups": groups, "worker_id": i, "out_dir": str(work_dir)})
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.loadgen",
                str(path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=1 << 24,
            )
            w = WorkerProc(i, proc)
            w.pump = asyncio.create_task(_pump(w))
            procs.append(w)
        load = Load(procs, progress)
        yield load
        await load.close()
    finally:
        for w in procs:
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
