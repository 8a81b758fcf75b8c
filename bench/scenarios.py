"""The benchmark scenarios. Each takes a running ``System`` and returns a
JSON-able dict of its measurements (or ``{"error": ...}`` when the system
could not take the load, e.g. could not accept the connections in time).

* ``fanout``: one channel, N receivers, one sender at a fixed rate.
* ``throughput``: N receivers (one distinct user each by default), the
  publish rate ramped until all-members p99 passes the limit; the best
  passing step is the answer. Every step records server CPU per delivery.
* ``join_storm``: a channel of M members (distinct users) and a sender at a
  steady rate; all-members latency of the members already there, first
  steady, then while J more distinct users join within W seconds, then
  steady again with everyone in.
* ``many_channels``: C channels of M members, each with a publishing member.
* ``connect`` (+ ``idle``): open many connections, then hold them idle and
  sample RSS and CPU of every server process.
* ``replay``: Waddle only, ``sync`` after M missed messages.
* ``hibernation``: C channels of two members (one identity per connection),
  M messages per channel, then idle for three idle periods: RSS of every
  process against its empty baseline, and CPU while idle. Waddle runs twice,
  hibernation on (``WADDLE_CHANNEL_IDLE_SECONDS``) and off (``0``); then it
  times the first message into W sleeping channels and into the same
  channels awake, and restarts the channel shard to count the store calls
  that re-registering every connection costs. The peers run the same
  traffic and idle period. Repeated ``hib_runs`` times.
* ``huge_channel`` (``bench/huge_channel.py``): Waddle only, one channel of
  32,768 members over several edge processes; repeated ``huge_runs`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench import procstat
from bench.driver import Load, Progress, split_groups, start_load
from bench.ramp import RateRamp, StepResult
from bench.stats import (
    all_members,
    cpu_us_per_delivery,
    quantiles_ms,
    slowest_per_message_ms,
    summarize_ns,
)
from bench.systems import System


@dataclass
class Config:
    fanout_sizes: list[int] = field(default_factory=lambda: [100, 1000, 5000, 10000])
    fanout_rate: float = 10.0
    fanout_duration: float = 10.0
    # Distinct identities among one channel's receivers (0: one per connection).
    # Waddle's presence makes a join cost O(members) (see docs/performance.md).
    fanout_users: int = 100
    content_size: int = 200
    throughput_members: int = 1000
    throughput_users: int = 0  # distinct identities among the receivers (0: one each)
    throughput_start: float = 25.0
    throughput_factor: float = 1.6
    throughput_step: float = 5.0
    throughput_limit_ms: float = 100.0
    throughput_max_rate: float = 2000.0
    storm_members: int = 100  # in the channel before the storm, each its own user
    storm_joiners: int = 1000  # distinct users joining during the storm
    storm_within: float = 2.0  # seconds over which their joins start
    storm_rate: float = 50.0  # publishes per second, steady and during the storm
    storm_steady: float = 6.0  # seconds of each steady window
    many_channels: int = 1000
    many_members: int = 10
    many_rate: float = 1000.0
    many_duration: float = 10.0
    connect_total: int = 10000
    connect_channel_size: int = 100
    connect_concurrency: int = 100
    idle_seconds: float = 10.0
    replay_messages: int = 1000
    replay_rounds: int = 3
    workers: int = 1
    edge_workers: int = 1  # WADDLE_EDGE_WORKERS (not for hibernation and huge-channel)
    drain: float = 10.0
    connect_timeout: float = 240.0
    profile_seconds: float = 0.0  # > 0: py-spy the server during one throughput step
    profile_rate: float = 0.0  # publishes per second of that step (0: the best passing rate)
    profile_dir: Path | None = None
    hib_channels: int = 5000
    hib_messages: int = 20
    # Publishes per second while the channels fill: what one shard on PostgreSQL
    # sustains on two shared cores while it wakes the channels that fell
    # asleep between their members' joins and the first message.
    hib_rate: float = 1000.0
    hib_idle: float = 10.0  # WADDLE_CHANNEL_IDLE_SECONDS with hibernation on
    # Idle CPU is averaged over this long once everything sleeps: one whole
    # WADDLE_HEARTBEAT_SECONDS (default 30), so the window holds exactly one
    # heartbeat round whatever its phase.
    hib_cpu_window: float = 30.0
    hib_wake_channels: int = 500
    hib_wake_rate: float = 100.0  # first messages per second into sleeping channels
    hib_runs: int = 3
    huge_members: int = 32768  # one channel (bench/huge_channel.py)
    huge_users: int = 0  # distinct identities among them (0: one per connection)
    huge_edge_workers: int = 2  # WADDLE_EDGE_WORKERS
    huge_loadgen_workers: int = 3  # each under the fd limit, from its own loopback address
    huge_rate: float = 1.0
    huge_duration: float = 20.0
    huge_runs: int = 3
    huge_settle: float = 3.0  # seconds between the last connect and the RSS sample

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["profile_dir"] = str(self.profile_dir) if self.profile_dir else None
        return out


@dataclass(eq=False)
class Context:
    config: Config
    progress: Progress
    work_dir: Path


def _spec(
    system: System, cfg: Config, groups: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    return {
        "proto": system.proto,
        "base_url": system.base_url,
        "jwt_secret": system.jwt_secret,
        "content_size": cfg.content_size,
        "concurrency": concurrency,
        "connect_timeout": cfg.connect_timeout,
        "groups": groups,
    }


def _expected(groups: list[dict[str, Any]], workers: int) -> list[int]:
    """Deliveries of one message of the first group, per worker."""
    parts = split_groups(groups[:1], workers)
    out = []
    for part in parts:
        n = 0
        for g in part:
            n += int(g.get("receivers", 0)) + (
                1 if g.get("sender") and g.get("sender_records") else 0
            )
        out.append(n)
    return out


def _connect_summary(c: dict[str, Any]) -> dict[str, Any]:
    ms = np.asarray(c["connect_ms"], dtype=np.float64)
    return {
        "connected": c["connected"],
        "failures": c["failures"],
        "retries": c["retries"],
        "connect_s": round(c["elapsed_s"], 2),
        "connects_per_s": round(c["connected"] / c["elapsed_s"], 1) if c["elapsed_s"] else 0.0,
        "connect_p50_ms": float(np.percentile(ms, 50)) if ms.size else math.nan,
        "connect_p99_ms": float(np.percentile(ms, 99)) if ms.size else math.nan,
        "first_error": c["first_error"],
    }


async def _window(
    load: Load,
    system: System,
    *,
    rate: float,
    duration: float,
    drain: float,
    members: int,
    expected_by_worker: list[int],
    label: str,
    join: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cpu = procstat.CpuWindow(
        {**system.pids(), **{f"loadgen{i}": p for i, p in enumerate(load.pids())}}
    )
    cpu.start()
    t0 = time.monotonic()
    summary, idx, lat = await load.run(
        rate=rate,
        duration=duration,
        drain=drain,
        expected_by_worker=expected_by_worker,
        label=label,
        join=join,
    )
    usage = cpu.stop()
    window_s = time.monotonic() - t0
    sent = int(summary["sent"])
    am = all_members(idx, lat, sent=sent, expected_per_message=members)
    expected = sent * members
    send_s = float(summary["send_seconds"])
    result: dict[str, Any] = {
        "rate": rate,
        "duration_s": round(send_s, 2),
        "sent": sent,
        "deliveries": int(idx.size),
        "expected": expected,
        "delivered_fraction": (idx.size / expected) if expected else 0.0,
        "deliveries_per_s": round(idx.size / send_s, 1) if send_s else 0.0,
        "delivery": summarize_ns(lat).as_dict(),
        "all_members": summarize_ns(am.complete_latencies_ns).as_dict(),
        "delivery_cdf_ms": quantiles_ms(lat),
        "all_members_cdf_ms": quantiles_ms(am.complete_latencies_ns),
        "complete_messages": am.complete,
        "incomplete_messages": am.incomplete,
        "duplicates": am.duplicates,
        "acks": summary["acks"],
        "cpu_percent": usage,
        "window_s": round(window_s, 3),
    }
    if join is not None:
        result["join"] = summary.get("join")
        # When in the storm the slow messages were sent.
        result["slowest_per_message_ms"] = slowest_per_message_ms(idx, lat, sent=sent)
    result["server_cpu_us_per_delivery"] = cpu_us_per_delivery(result)
    return result


async def edge_fanout_histogram(system: System) -> dict[str, float] | None:
    """Waddle's own view: ``waddle_edge_fanout_latency_seconds`` (p50/p99 from buckets)."""
    if system.name != "waddle":
        return None
    port = system.base_url.rsplit(":", 1)[1]
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=10)
            ) as r,
        ):
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return histogram_quantiles(text, "waddle_edge_fanout_latency_seconds")


def histogram_quantiles(text: str, name: str) -> dict[str, float] | None:
    """p50/p99 (ms, bucket upper bounds) and count of a Prometheus histogram."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            upper = math.inf if bound == "+Inf" else float(bound)
            buckets.append((upper, float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    out: dict[str, float] = {"count": total}
    for q in (0.5, 0.99):
        for upper, count in buckets:
            if count >= q * total:
                out[f"p{int(q * 100)}_ms"] = upper * 1000
                break
    return out


# -- scenarios ---------------------------------------------------------------------


async def fanout(system: System, ctx: Context, n: int) -> dict[str, Any]:
    cfg = ctx.config
    groups = [
        {
            "channel": f"fanout-{n}-{uuid.uuid4().hex[:6]}",
            "receivers": n,
            "sender": True,
            "users": cfg.fanout_users,
        }
    ]
    spec = _spec(system, cfg, groups, cfg.connect_concurrency)
    async with start_load(
        spec, workers=cfg.workers, work_dir=ctx.work_dir, progress=ctx.progress
    ) as load:
        c = await load.wait_connected(cfg.connect_timeout + 30)
        result: dict[str, Any] = {"members": n, "connect": _connect_summary(c)}
        if c["connected"] < n + 1:
            result["error"] = f"connected {c['connected']} of {n + 1}: {c['first_error']}"
            return result
        await asyncio.sleep(1.0)
        result.update(
            await _window(
                load,
                system,
                rate=cfg.fanout_rate,
                duration=cfg.fanout_duration,
                drain=cfg.drain,
                members=n,
                expected_by_worker=_expected(groups, cfg.workers),
                label=f"fanout N={n}",
            )
        )
        result["server_fanout"] = await edge_fanout_histogram(system)
        return result


async def throughput(system: System, ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    n = cfg.throughput_members
    groups = [
        {
            "channel": f"tput-{uuid.uuid4().hex[:6]}",
            "receivers": n,
            "sender": True,
            "users": cfg.throughput_users,
        }
    ]
    spec = _spec(system, cfg, groups, cfg.connect_concurrency)
    ramp = RateRamp(
        start=cfg.throughput_start,
        factor=cfg.throughput_factor,
        limit_ms=cfg.throughput_limit_ms,
        max_rate=cfg.throughput_max_rate,
    )
    steps: list[dict[str, Any]] = []
    async with start_load(
        spec, workers=cfg.workers, work_dir=ctx.work_dir, progress=ctx.progress
    ) as load:
        c = await load.wait_connected(cfg.connect_timeout + 30)
        result: dict[str, Any] = {"members": n, "connect": _connect_summary(c), "steps": steps}
        if c["connected"] < n + 1:
            result["error"] = f"connected {c['connected']} of {n + 1}: {c['first_error']}"
            return result
        await asyncio.sleep(1.0)
        rate: float | None = ramp.first()
        while rate is not None:
            step = await _window(
                load,
                system,
                rate=rate,
                duration=cfg.throughput_step,
                drain=cfg.drain,
                members=n,
                expected_by_worker=_expected(groups, cfg.workers),
                label=f"throughput {rate:.0f} msg/s",
            )
            p99 = step["all_members"]["p99_ms"]
            step["passed"] = StepResult(
                rate, p99, step["delivered_fraction"], step["deliveries_per_s"]
            ).passes(ramp.limit_ms, ramp.min_fraction)
            steps.append(step)
            ctx.progress.show(
                f"throughput {rate:.0f} msg/s: {step['deliveries_per_s']:.0f} deliveries/s, "
                f"all-members p99 {p99:.1f} ms, {'pass' if step['passed'] else 'fail'}",
                force=True,
            )
            rate = ramp.next(
                StepResult(rate, p99, step["delivered_fraction"], step["deliveries_per_s"])
            )
            await asyncio.sleep(1.0)
        best = ramp.best
        result["best"] = next(
            (s for s in steps if best is not None and s["passed"] and s["rate"] == best.rate),
            None,
        )
        if cfg.profile_seconds > 0 and cfg.profile_dir is not None and system.name == "waddle":
            prate = cfg.profile_rate or (best.rate if best is not None else cfg.throughput_start)
            result["profile"] = await _profile_step(load, system, ctx, groups, prate)
        return result


async def _profile_step(
    load: Load, system: System, ctx: Context, groups: list[dict[str, Any]], rate: float
) -> dict[str, Any]:
    from bench import profile

    cfg = ctx.config
    assert cfg.profile_dir is not None
    recorders = await profile.start(system.pids(), cfg.profile_dir, cfg.profile_seconds)
    step = await _window(
        load,
        system,
        rate=rate,
        duration=cfg.profile_seconds + 1,
        drain=cfg.drain,
        members=cfg.throughput_members,
        expected_by_worker=_expected(groups, cfg.workers),
        label=f"profiling at {rate:.0f} msg/s",
    )
    files = await profile.finish(recorders)
    return {"rate": rate, "step": step, "files": files}


async def join_storm(system: System, ctx: Context) -> dict[str, Any]:
    """Steady, storm (``storm_joiners`` distinct users join within ``storm_within``
    s), steady again; all-members latency over the members present before it."""
    cfg = ctx.config
    m = cfg.storm_members
    channel = f"storm-{uuid.uuid4().hex[:6]}"
    groups = [{"channel": channel, "receivers": m, "sender": True, "users": 0}]
    spec = _spec(system, cfg, groups, cfg.connect_concurrency)
    async with start_load(
        spec, workers=cfg.workers, work_dir=ctx.work_dir, progress=ctx.progress
    ) as load:
        c = await load.wait_connected(cfg.connect_timeout + 30)
        result: dict[str, Any] = {
            "members": m,
            "joiners": cfg.storm_joiners,
            "within_s": cfg.storm_within,
            "rate": cfg.storm_rate,
            "connect": _connect_summary(c),
        }
        if c["connected"] < m + 1:
            result["error"] = f"connected {c['connected']} of {m + 1}: {c['first_error']}"
            return result
        await asyncio.sleep(1.0)
        common: dict[str, Any] = {
            "rate": cfg.storm_rate,
            "drain": cfg.drain,
            "members": m,
            "expected_by_worker": _expected(groups, cfg.workers),
        }
        result["steady"] = await _window(
            load, system, duration=cfg.storm_steady, label="steady", **common
        )
        recorders = []
        if cfg.profile_seconds > 0 and cfg.profile_dir is not None and system.name == "waddle":
            from bench import profile

            recorders = await profile.start(
                system.pids(), cfg.profile_dir / "join-storm", cfg.storm_within + 1.5
            )
        # The send window covers the storm: half a second before the first
        # join until a second after the last one starts.
        result["storm"] = await _window(
            load,
            system,
            duration=cfg.storm_within + 1.5,
            label=f"{cfg.storm_joiners} joining",
            join={
                "channel": channel,
                "count": cfg.storm_joiners,
                "within": cfg.storm_within,
                "after": 0.5,
            },
            **common,
        )
        if recorders:
            from bench import profile

            result["profile"] = {"files": await profile.finish(recorders)}
        await asyncio.sleep(1.0)
        result["after"] = await _window(
            load, system, duration=cfg.storm_steady, label="steady, everyone in", **common
        )
        # Steady state is the channel at its final size (everyone in); the
        # ratio to the smaller channel before the storm is kept too.
        storm = result["storm"]["all_members"]["p99_ms"]
        for key, window in (("storm_vs_steady_p99", "after"), ("storm_vs_before_p99", "steady")):
            steady = result[window]["all_members"]["p99_ms"]
            result[key] = storm / steady if steady and steady == steady else None
        return result


async def many_channels(system: System, ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    tag = uuid.uuid4().hex[:6]
    m = cfg.many_members
    groups = [
        {"channel": f"many-{tag}-{i}", "receivers": m - 1, "sender": True, "sender_records": True}
        for i in range(cfg.many_channels)
    ]
    spec = _spec(system, cfg, groups, cfg.connect_concurrency)
    total = cfg.many_channels * m
    async with start_load(
        spec, workers=cfg.workers, work_dir=ctx.work_dir, progress=ctx.progress
    ) as load:
        c = await load.wait_connected(cfg.connect_timeout + 30)
        result: dict[str, Any] = {
            "channels": cfg.many_channels,
            "members": m,
            "connect": _connect_summary(c),
        }
        if c["connected"] < total:
            result["error"] = f"connected {c['connected']} of {total}: {c['first_error']}"
            return result
        await asyncio.sleep(1.0)
        result.update(
            await _window(
                load,
                system,
                rate=cfg.many_rate,
                duration=cfg.many_duration,
                drain=cfg.drain,
                members=m,
                expected_by_worker=_expected(groups, cfg.workers),
                label=f"{cfg.many_channels} channels x {m}",
            )
        )
        return result


async def connect_idle(system: System, ctx: Context) -> dict[str, Any]:
    """Connect ``connect_total`` clients (channels of ``connect_channel_size``), then idle."""
    cfg = ctx.config
    tag = uuid.uuid4().hex[:6]
    size = cfg.connect_channel_size
    count = math.ceil(cfg.connect_total / size)
    groups = [
        {"channel": f"conn-{tag}-{i}", "receivers": min(size, cfg.connect_total - i * size)}
        for i in range(count)
    ]
    spec = _spec(system, cfg, groups, cfg.connect_concurrency)
    await asyncio.sleep(1.0)
    rss_before = procstat.rss_bytes(system.edge_pid())
    async with start_load(
        spec, workers=cfg.workers, work_dir=ctx.work_dir, progress=ctx.progress
    ) as load:
        c = await load.wait_connected(cfg.connect_timeout + 30)
        connect = _connect_summary(c)
        connect["target"] = cfg.connect_total
        ctx.progress.show(
            f"idle: {c['connected']} connections, sampling {cfg.idle_seconds:.0f}s", force=True
        )
        await asyncio.sleep(3.0)
        rss_after = procstat.rss_bytes(system.edge_pid())
        pids = {**system.pids(), **{f"loadgen{i}": p for i, p in enumerate(load.pids())}}
        cpu = await procstat.cpu_percent(pids, cfg.idle_seconds)
        alive = system.alive()
    idle = {
        "connections": c["connected"],
        "edge_rss_before_mb": round(rss_before / 2**20, 1),
        "edge_rss_after_mb": round(rss_after / 2**20, 1),
        "rss_per_connection_kb": round((rss_after - rss_before) / max(1, c["connected"]) / 1024, 2),
        "cpu_percent": {k: round(v, 2) for k, v in cpu.items()},
        "window_s": cfg.idle_seconds,
        "server_alive": alive,
    }
    return {"connect": connect, "idle": idle}


async def replay(system: System, ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    if system.name != "waddle":
        return {"error": "not applicable (no persistence)"}
    groups = [{"channel": f"replay-{uuid.uuid4().hex[:6]}", "receivers": 0, "sender": True}]
    spec = _spec(system, cfg, groups, 10)
    async with start_load(spec, workers=1, work_dir=ctx.work_dir, progress=ctx.progress) as load:
        c = await load.wait_connected(60)
        if c["connected"] < 1:
            return {"error": f"could not connect: {c['first_error']}"}
        ctx.progress.show(
            f"replay: {cfg.replay_rounds} x sync after {cfg.replay_messages}", force=True
        )
        r = await load.replay(cfg.replay_messages, cfg.replay_rounds)
    times = np.asarray(r["times_ms"], dtype=np.float64)
    return {
        "messages": cfg.replay_messages,
        "rounds": cfg.replay_rounds,
        "times_ms": [round(t, 1) for t in r["times_ms"]],
        "replayed_counts": r["counts"],
        "p50_ms": float(np.percentile(times, 50)) if times.size else math.nan,
        "max_ms": float(times.max()) if times.size else math.nan,
        "messages_per_s": (
            round(cfg.replay_messages / (float(np.percentile(times, 50)) / 1000), 0)
            if times.size
            else 0.0
        ),
    }


# -- hibernation -----------------------------------------------------------------------

Launcher = Callable[[Mapping[str, str] | None, str], contextlib.AbstractAsyncContextManager[System]]


async def scrape(url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples by name (labels joined in: ``name{k=v}``)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def _channel_metrics_url(system: System) -> str:
    return f"http://127.0.0.1:{system.service('channel').port('metrics_port')}/metrics"


def _histogram_ms(samples: Mapping[str, float], name: str) -> dict[str, float] | None:
    """p50/p99 (ms, bucket upper bounds) and count of a scraped histogram."""
    buckets: list[tuple[float, float]] = []
    for key, value in samples.items():
        if key.startswith(name + "_bucket{"):
            bound = key.split("le=", 1)[1].rstrip("}")
            buckets.append((math.inf if bound == "+Inf" else float(bound), value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    out: dict[str, float] = {"count": total}
    for q in (0.5, 0.99):
        out[f"p{int(q * 100)}_ms"] = next(u for u, c in buckets if c >= q * total) * 1000
    return out


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


async def _wait_metric(
    system: System, name: str, want: float, timeout: float
) -> tuple[float, dict[str, float]]:
    """Seconds until the channel service reports ``name`` = ``want`` (or NaN)."""
    started = time.monotonic()
    samples: dict[str, float] = {}
    while time.monotonic() - started < timeout:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            samples = await scrape(_channel_metrics_url(system))
            if samples.get(name) == want:
                return time.monotonic() - started, samples
        await asyncio.sleep(0.1)
    return math.nan, samples


async def _latency_window(
    load: Load, label: str, *, senders: tuple[int, int], rate: float, drain: float
) -> dict[str, Any]:
    summary, idx, lat = await load.run(
        rate=rate,
        duration=senders[1] / rate,
        drain=drain,
        expected_by_worker=[1] + [0] * (len(load.workers) - 1),
        label=label,
        senders=senders,
    )
    return {
        "sent": int(summary["sent"]),
        "delivered": int(idx.size),
        "latency": summarize_ns(lat).as_dict(),
    }


async def _hibernation_run(
    system: System, ctx: Context, idle: float | None, tag: str
) -> dict[str, Any]:
    """One system (one mode): fill, idle, and for Waddle wake and restart."""
    cfg = ctx.config
    n = cfg.hib_channels
    await asyncio.sleep(1.0)
    pids = system.pids()
    baseline = {role: procstat.rss_bytes(pid) for role, pid in pids.items()}
    groups = [{"channel": f"hib-{tag}-{i}", "receivers": 1, "sender": True} for i in range(n)]
    # A channel's two members join together: the scenario is about channels
    # that go quiet after traffic, not about channels that sleep between joins.
    spec = {**_spec(system, cfg, groups, cfg.connect_concurrency), "order": "by_group"}
    out: dict[str, Any] = {"idle_setting_s": idle, "baseline_rss_mb": {}}
    out["baseline_rss_mb"] = {k: _mb(v) for k, v in baseline.items()}
    async with start_load(
        spec, workers=cfg.workers, work_dir=ctx.work_dir, progress=ctx.progress
    ) as load:
        c = await load.wait_connected(cfg.connect_timeout + 30)
        out["connect"] = _connect_summary(c)
        if c["connected"] < 2 * n:
            out["error"] = f"connected {c['connected']} of {2 * n}: {c['first_error']}"
            return out
        total = n * cfg.hib_messages
        ctx.progress.show(f"hibernation: {total} messages into {n} channels", force=True)
        summary, idx, _ = await load.run(
            rate=cfg.hib_rate,
            duration=total / cfg.hib_rate,
            drain=cfg.drain,
            expected_by_worker=[1] + [0] * (len(load.workers) - 1),
            label=f"filling {n} channels",
        )
        out["fill"] = {"sent": int(summary["sent"]), "delivered": int(idx.size)}
        loaded = {role: procstat.rss_bytes(pid) for role, pid in pids.items()}
        out["loaded_rss_mb"] = {k: _mb(v) for k, v in loaded.items()}
        # Idle for two idle periods (the same time with hibernation off), by
        # when everything that hibernates has; then CPU over one heartbeat
        # interval (or one more idle period, whichever is longer).
        period = cfg.hib_idle
        window = max(period, cfg.hib_cpu_window)
        idle_total = 2 * period + window
        ctx.progress.show(f"hibernation: idle {idle_total:.0f} s", force=True)
        timeline: list[dict[str, float]] = []
        started = time.monotonic()
        cpu = procstat.CpuWindow({**pids, **{f"loadgen{i}": p for i, p in enumerate(load.pids())}})
        cpu_started = False
        while (elapsed := time.monotonic() - started) < idle_total:
            if not cpu_started and elapsed >= 2 * period:
                cpu.start()
                cpu_started = True
            timeline.append(
                {"t": round(elapsed, 1)}
                | {role: _mb(procstat.rss_bytes(pid)) for role, pid in pids.items()}
            )
            await asyncio.sleep(min(1.0, idle_total - elapsed))
        out["idle_cpu_percent"] = cpu.stop()
        out["idle_cpu_window_s"] = window
        out["rss_timeline_mb"] = timeline
        rested = {role: procstat.rss_bytes(pid) for role, pid in pids.items()}
        out["idle_rss_mb"] = {k: _mb(v) for k, v in rested.items()}
        out["above_baseline_mb"] = {k: _mb(rested[k] - baseline[k]) for k in rested}
        socket_role = "edge" if system.name == "waddle" else "server"
        out["socket_rss_per_connection_kb"] = round(
            (rested[socket_role] - baseline[socket_role]) / (2 * n) / 1024, 2
        )
        if system.name != "waddle":
            return out
        samples = await scrape(_channel_metrics_url(system))
        out["asleep"] = samples.get("waddle_channel_hibernated_channels", 0.0)
        out["awake"] = samples.get("waddle_channel_active_channels", 0.0)
        # What the sleeping channels' records take (the packed table), per channel.
        kept = samples.get("waddle_channel_hibernated_bytes")
        out["dormant_bytes_per_channel"] = (
            round(kept / out["asleep"], 1) if kept is not None and out["asleep"] else None
        )
        # The first message into sleeping channels, then into the same channels awake.
        w = min(cfg.hib_wake_channels, n)
        ctx.progress.show(f"hibernation: first message into {w} channels", force=True)
        out["wake"] = await _latency_window(
            load, "waking", senders=(0, w), rate=cfg.hib_wake_rate, drain=cfg.drain
        )
        out["awake_again"] = await _latency_window(
            load, "awake", senders=(0, w), rate=cfg.hib_wake_rate, drain=cfg.drain
        )
        after = await scrape(_channel_metrics_url(system))
        out["wake_seconds"] = _histogram_ms(after, "waddle_channel_wake_seconds")
        out["wakes"] = after.get("waddle_channel_wakes_total{reason=event}", 0.0)
        # A shard restart: every connection is re-registered by the edge.
        ctx.progress.show("hibernation: restarting the channel shard", force=True)
        t0 = time.monotonic()
        await system.restart("channel", "grpc_port", "WADDLE_CHANNEL_PORT")
        took, samples = await _wait_metric(system, "waddle_channel_members", float(2 * n), 180)
        # Head checks (hibernation on) run in the background: let them finish.
        if idle:
            await _wait_metric(system, "waddle_channel_loads_total{kind=head}", float(n), 60)
            samples = await scrape(_channel_metrics_url(system))
        out["restart"] = {
            "restart_to_registered_s": round(time.monotonic() - t0, 2) if took == took else None,
            "registered_s": round(took, 2) if took == took else None,
            "full_loads": samples.get("waddle_channel_loads_total{kind=full}"),
            "head_checks": samples.get("waddle_channel_loads_total{kind=head}"),
            "awake_after": samples.get("waddle_channel_active_channels"),
            "asleep_after": samples.get("waddle_channel_hibernated_channels"),
            "channel_rss_mb": _mb(procstat.rss_bytes(system.service("channel").pid)),
        }
        return out


def _median(values: list[float]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def _dig(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def hibernation_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min-max over the runs of what the report shows."""
    out: dict[str, Any] = {}
    modes = sorted({m for r in runs for m in r})
    for mode in modes:
        per = [r[mode] for r in runs if mode in r and "error" not in r[mode]]

        def med(*path: str, rows: list[dict[str, Any]] = per) -> dict[str, float] | None:
            return _median([_dig(p, *path) for p in rows])

        cpu_max = [
            max(
                (
                    v
                    for k, v in p.get("idle_cpu_percent", {}).items()
                    if not k.startswith("loadgen")
                ),
                default=math.nan,
            )
            for p in per
        ]
        out[mode] = {
            "runs": len(per),
            "channel_above_baseline_mb": med("above_baseline_mb", "channel"),
            "server_above_baseline_mb": med("above_baseline_mb", "server"),
            "channel_loaded_mb": med("loaded_rss_mb", "channel"),
            "channel_idle_mb": med("idle_rss_mb", "channel"),
            "socket_rss_per_connection_kb": med("socket_rss_per_connection_kb"),
            "idle_cpu_max_percent": _median(cpu_max),
            "asleep": med("asleep"),
            "dormant_bytes_per_channel": med("dormant_bytes_per_channel"),
            "wake_p50_ms": med("wake", "latency", "p50_ms"),
            "wake_p99_ms": med("wake", "latency", "p99_ms"),
            "awake_p50_ms": med("awake_again", "latency", "p50_ms"),
            "awake_p99_ms": med("awake_again", "latency", "p99_ms"),
            "wake_added_p99_ms": _median(
                [
                    _dig(p, "wake", "latency", "p99_ms")
                    - _dig(p, "awake_again", "latency", "p99_ms")
                    for p in per
                    if _dig(p, "wake", "latency", "p99_ms") is not None
                    and _dig(p, "awake_again", "latency", "p99_ms") is not None
                ]
            ),
            "restart_registered_s": med("restart", "registered_s"),
            "restart_full_loads": med("restart", "full_loads"),
            "restart_head_checks": med("restart", "head_checks"),
        }
    on, off = out.get("on"), out.get("off")
    if on and off:
        savings = []
        for r in runs:
            a = _dig(r, "on", "above_baseline_mb", "channel")
            b = _dig(r, "off", "above_baseline_mb", "channel")
            if a is not None and b:
                savings.append(100.0 * (1 - a / b))
        out["channel_rss_saving_percent"] = _median(savings)
    return out


async def hibernation(name: str, ctx: Context, launch: Launcher) -> dict[str, Any]:
    """``hib_runs`` runs; Waddle with hibernation on and off in each run."""
    cfg = ctx.config
    modes: list[tuple[str, float | None]] = (
        [("on", cfg.hib_idle), ("off", 0.0)] if name == "waddle" else [("-", None)]
    )
    runs: list[dict[str, Any]] = []
    for r in range(cfg.hib_runs):
        one: dict[str, Any] = {}
        for mode, idle in modes:
            ctx.progress.prefix = f"{name} hibernation {mode} run {r + 1}/{cfg.hib_runs}"
            env = None if idle is None else {"WADDLE_CHANNEL_IDLE_SECONDS": str(idle)}
            async with launch(env, f"{mode}-{r}") as system:
                one[mode] = await _hibernation_run(
                    system, ctx, idle, f"{uuid.uuid4().hex[:6]}-{mode}"
                )
                one[mode]["server_alive"] = system.alive()
        runs.append(one)
    return {"runs": runs, "summary": hibernation_summary(runs)}
