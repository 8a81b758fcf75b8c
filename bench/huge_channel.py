"""The ``huge-channel`` scenario (Waddle only): one channel of 32,768 members,
the most WebSockets one Cloudflare Durable Object accepts, spread over
several edge processes on this machine (``WADDLE_EDGE_WORKERS``).

Each run starts a fresh stack with the per-channel cap raised through the
environment (``WADDLE_CHANNEL_MAX_CONNECTIONS``; the default stays 10,000),
connects every member through ``huge_loadgen_workers`` load-generator
processes (each from its own loopback address: one address has about 28k
ephemeral ports towards one server port), then publishes at a low rate
(1 msg/s for 20 s by default) and measures when each message had reached
every member. It records the connect time, all-members latency, losses,
edge RSS per connection (the workers' RSS above their empty baseline) and the
channel service's RSS. ``huge_runs`` runs; the summary is the median with
min and max.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench import procstat
from bench.driver import start_load
from bench.scenarios import (
    Context,
    Launcher,
    _connect_summary,
    _dig,
    _expected,
    _mb,
    _median,
    _spec,
    _window,
    scrape,
)
from bench.systems import System, edge_workers


async def per_worker_connections(system: System) -> dict[str, float]:
    """``waddle_edge_connections`` of each worker, from the edge supervisor's merged scrape."""
    edge = system.service("edge")
    port = edge.ready.get("ops_port") or edge.port("http_port")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=20)) as r,
    ):
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "waddle_edge_connections":
            for sample in family.samples:
                out[f"w{sample.labels.get('worker', '0')}"] = sample.value
    return out


async def one_run(system: System, ctx: Context, workers: int) -> dict[str, Any]:
    cfg = ctx.config
    members = cfg.huge_members
    await asyncio.sleep(1.0)
    edges = edge_workers(system)
    roles = {
        **edges,
        "channel": system.service("channel").pid,
        "store": system.service("store").pid,
    }
    baseline = {role: procstat.rss_bytes(pid) for role, pid in roles.items()}
    groups = [
        {
            "channel": f"huge-{uuid.uuid4().hex[:6]}",
            "receivers": members - 1,
            "sender": True,
            "users": cfg.huge_users,
        }
    ]
    spec = {**_spec(system, cfg, groups, cfg.connect_concurrency), "spread_source_ips": True}
    out: dict[str, Any] = {
        "members": members,
        "edge_workers": workers,
        "loadgen_workers": cfg.huge_loadgen_workers,
        "baseline_rss_mb": {k: _mb(v) for k, v in baseline.items()},
    }
    async with start_load(
        spec, workers=cfg.huge_loadgen_workers, work_dir=ctx.work_dir, progress=ctx.progress
    ) as load:
        c = await load.wait_connected(cfg.connect_timeout + 30)
        out["connect"] = _connect_summary(c)
        if c["connected"] < members:
            out["error"] = f"connected {c['connected']} of {members}: {c['first_error']}"
            return out
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            out["connections_per_worker"] = await per_worker_connections(system)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            channel = system.service("channel")
            samples = await scrape(f"http://127.0.0.1:{channel.port('metrics_port')}/metrics")
            out["channel_members_metric"] = samples.get("waddle_channel_members")
        await asyncio.sleep(cfg.huge_settle)
        loaded = {role: procstat.rss_bytes(pid) for role, pid in roles.items()}
        out["connected_rss_mb"] = {k: _mb(v) for k, v in loaded.items()}
        edge_delta = sum(loaded[r] - baseline[r] for r in edges)
        out["edge_rss_per_connection_kb"] = round(edge_delta / members / 1024, 2)
        out["channel_rss_mb"] = _mb(loaded["channel"])
        out["channel_rss_above_baseline_mb"] = _mb(loaded["channel"] - baseline["channel"])
        ctx.progress.show(
            f"huge channel: {members} members, {cfg.huge_rate:g} msg/s for {cfg.huge_duration:g} s",
            force=True,
        )
        supervisor = {} if "edge" in edges else {"edge supervisor": system.service("edge").pid}
        cpu = procstat.CpuWindow({**roles, **supervisor})
        cpu.start()
        window = await _window(
            load,
            system,
            rate=cfg.huge_rate,
            duration=cfg.huge_duration,
            drain=cfg.drain,
            members=members - 1,
            expected_by_worker=_expected(groups, cfg.huge_loadgen_workers),
            label=f"huge channel {members}",
        )
        out["window_cpu_percent"] = cpu.stop()
        out.update(window)
        out["lost"] = int(window["expected"] - window["deliveries"])
        out["server_alive"] = system.alive()
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]

    def med(*path: str) -> dict[str, float] | None:
        return _median([_dig(r, *path) for r in ok])

    def edge_cpu(run: dict[str, Any]) -> float:
        cpu = run.get("window_cpu_percent") or {}
        vals = [v for k, v in cpu.items() if k.startswith("edge")]  # the supervisor's too
        return sum(vals) if vals else math.nan

    return {
        "runs": len(runs),
        "complete_runs": len(ok),
        "connect_s": med("connect", "connect_s"),
        "connects_per_s": med("connect", "connects_per_s"),
        "all_members_p50_ms": med("all_members", "p50_ms"),
        "all_members_p99_ms": med("all_members", "p99_ms"),
        "delivery_p99_ms": med("delivery", "p99_ms"),
        "delivered_fraction": med("delivered_fraction"),
        "lost": med("lost"),
        "incomplete_messages": med("incomplete_messages"),
        "duplicates": med("duplicates"),
        "edge_rss_per_connection_kb": med("edge_rss_per_connection_kb"),
        "channel_rss_mb": med("channel_rss_mb"),
        "channel_rss_above_baseline_mb": med("channel_rss_above_baseline_mb"),
        "edge_cpu_percent_in_window": _median([edge_cpu(r) for r in ok]),
        "channel_cpu_percent_in_window": med("window_cpu_percent", "channel"),
    }


async def huge_channel(name: str, ctx: Context, launch: Launcher) -> dict[str, Any]:
    """``huge_runs`` runs, each on a fresh stack with ``huge_edge_workers`` edge processes."""
    if name != "waddle":
        return {"error": "not applicable (Waddle's edge workers)"}
    cfg = ctx.config
    env = {
        "WADDLE_EDGE_WORKERS": str(cfg.huge_edge_workers),
        # The default (10,000 per channel) is a protection; this scenario is the exception.
        "WADDLE_CHANNEL_MAX_CONNECTIONS": str(cfg.huge_members),
        "WADDLE_EDGE_MAX_CONNECTIONS": str(cfg.huge_members),
        "WADDLE_USER_MAX_CONNECTIONS": str(cfg.huge_members),
    }
    runs: list[dict[str, Any]] = []
    for r in range(cfg.huge_runs):
        ctx.progress.prefix = f"{name} huge-channel run {r + 1}/{cfg.huge_runs}"
        async with launch(env, f"huge-{r}") as system:
            runs.append(await one_run(system, ctx, cfg.huge_edge_workers))
    return {"runs": runs, "summary": summary(runs)}


def _cell(entry: Any, digits: int = 1) -> str:
    """``median (min to max)`` of a summary entry, or ``-``."""
    if not isinstance(entry, dict) or entry.get("median") is None:
        return "-"
    lo, mid, hi = (float(entry[k]) for k in ("min", "median", "max"))
    if lo == hi:
        return f"{mid:,.{digits}f}"
    return f"{mid:,.{digits}f} ({lo:,.{digits}f} to {hi:,.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    """The report's section: one row of medians (min to max) over the runs."""
    cfg = results["config"]
    block = (results["systems"].get("waddle") or {}).get("huge-channel") or {}
    s = block.get("summary")
    title = (
        f"### Huge channel — {cfg['huge_members']:,} members in one channel over "
        f"{cfg['huge_edge_workers']} edge processes, {cfg['huge_rate']:g} msg/s for "
        f"{cfg['huge_duration']:g} s"
    )
    if not s:
        return f"{title}\n\n{block.get('error', 'no result')}"
    header = [
        "runs",
        "connect s",
        "connects/s",
        "all-members p50 ms",
        "p99 ms",
        "delivered %",
        "lost",
        "edge RSS KB / connection",
        "channel-service RSS MB",
        "edge CPU % (all workers)",
    ]
    delivered = s.get("delivered_fraction")
    row = [
        f"{int(s['complete_runs'])}/{int(s['runs'])}",
        _cell(s.get("connect_s")),
        _cell(s.get("connects_per_s"), 0),
        _cell(s.get("all_members_p50_ms")),
        _cell(s.get("all_members_p99_ms")),
        _cell({k: 100 * float(v) for k, v in delivered.items()}, 2) if delivered else "-",
        _cell(s.get("lost"), 0),
        _cell(s.get("edge_rss_per_connection_kb")),
        _cell(s.get("channel_rss_mb")),
        _cell(s.get("edge_cpu_percent_in_window")),
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        "| " + " | ".join(row) + " |",
    ]
    return title + "\n\n" + "\n".join(lines)
