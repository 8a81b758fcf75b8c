"""CPU and memory of processes, sampled with psutil."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import psutil


def rss_bytes(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def cpu_percent(pids: Mapping[str, int], seconds: float) -> dict[str, float]:
    """CPU used by each process over ``seconds``, in percent of one core."""
    procs: dict[str, psutil.Process] = {}
    start: dict[str, float] = {}
    for role, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            procs[role] = psutil.Process(pid)
            start[role] = _cpu_seconds(procs[role])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.sleep(seconds)
    elapsed = loop.time() - t0
    out: dict[str, float] = {}
    for role, proc in procs.items():
        try:
            out[role] = 100.0 * (_cpu_seconds(proc) - start[role]) / elapsed
        except psutil.Error:
            out[role] = float("nan")
    return out


class CpuWindow:
    """CPU seconds of a set of processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for role, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self.procs[role] = psutil.Process(pid)
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        for role, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self._start[role] = _cpu_seconds(proc)

    def stop(self) -> dict[str, float]:
        elapsed = max(1e-9, asyncio.get_running_loop().time() - self._t0)
        out: dict[str, float] = {}
        for role, proc in self.procs.items():
            try:
                out[role] = round(100.0 * (_cpu_seconds(proc) - self._start[role]) / elapsed, 1)
            except (psutil.Error, KeyError):
                out[role] = float("nan")
        return out
