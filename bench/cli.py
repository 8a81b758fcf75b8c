"""Command line of the benchmark: ``python -m bench [options]``.

Runs the selected scenarios against the selected systems, one system at a
time (a fresh start of the system for each scenario group, so one overload
does not leak into the next), the whole set ``--runs`` times (default 3:
every figure is the median of the runs, with min-max beside it, and every
floor is measured in the same runs as Waddle), writes ``results.json``,
``results.md`` and PNG plots under ``--out`` and prints the tables.
``--smoke`` is the few-second
CI run: Waddle only, tiny sizes, one start of the stack; it exits non-zero
when no message was delivered.

Waddle runs on PostgreSQL when ``--database-url`` (or
``WADDLE_BENCH_DATABASE_URL``) is given, on the embedded SQLite otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench import huge_channel, report, scenarios, stats, systems
from bench.driver import LoadError, Progress
from bench.scenarios import Config, Context
from waddle_common.supervise import ServiceFailed

SCENARIOS = (
    "fanout",
    "throughput",
    "join-storm",
    "many-channels",
    "connect",
    "idle",
    "replay",
    "hibernation",
    "huge-channel",
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(bad)} (choose from {', '.join(allowed)})"
            )
        return names

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="few-second CI run against Waddle only")
    p.add_argument(
        "--runs",
        type=_positive,
        default=None,
        help="repetitions of the whole run; figures are medians with min-max (default 3, smoke 1)",
    )
    p.add_argument("--systems", type=_names(systems.SYSTEMS), default=list(systems.SYSTEMS))
    p.add_argument("--scenarios", type=_names(SCENARIOS), default=list(SCENARIOS))
    p.add_argument(
        "--fanout-sizes", type=_ints, default=None, help="receivers, e.g. 100,1000,5000,10000"
    )
    p.add_argument("--duration", type=float, default=None, help="fanout and many-channels seconds")
    p.add_argument(
        "--fanout-users",
        type=int,
        default=None,
        help="distinct users among a big channel's receivers (0: one per connection)",
    )
    p.add_argument("--rate", type=float, default=None, help="fanout publishes per second")
    p.add_argument("--step", type=float, default=None, help="throughput step seconds")
    p.add_argument("--throughput-members", type=int, default=None)
    p.add_argument(
        "--throughput-users",
        type=int,
        default=None,
        help="distinct users among the throughput receivers (0, the default: one each)",
    )
    p.add_argument("--storm-members", type=int, default=None, help="join-storm: members before")
    p.add_argument("--storm-joiners", type=int, default=None, help="join-storm: users joining")
    p.add_argument("--storm-within", type=float, default=None, help="join-storm: seconds")
    p.add_argument("--storm-rate", type=float, default=None, help="join-storm: msg/s")
    p.add_argument("--throughput-start", type=float, default=None, help="first ramp rate (msg/s)")
    p.add_argument("--many-channels", type=int, default=None)
    p.add_argument("--many-members", type=int, default=None)
    p.add_argument(
        "--many-rate", type=float, default=None, help="publishes per second, all channels"
    )
    p.add_argument("--connect-total", type=int, default=None)
    p.add_argument("--idle-seconds", type=float, default=None)
    p.add_argument("--replay-messages", type=int, default=None)
    p.add_argument("--hib-channels", type=int, default=None, help="hibernation: channels of 2")
    p.add_argument("--hib-messages", type=int, default=None, help="hibernation: per channel")
    p.add_argument("--hib-rate", type=float, default=None, help="hibernation: fill msg/s")
    p.add_argument(
        "--hib-idle", type=float, default=None, help="hibernation: WADDLE_CHANNEL_IDLE_SECONDS"
    )
    p.add_argument("--hib-wake-channels", type=int, default=None)
    p.add_argument("--hib-runs", type=int, default=None, help="hibernation: repetitions")
    p.add_argument("--huge-members", type=int, default=None, help="huge-channel: members")
    p.add_argument("--huge-runs", type=int, default=None, help="huge-channel: repetitions")
    p.add_argument(
        "--huge-edge-workers", type=int, default=None, help="huge-channel: WADDLE_EDGE_WORKERS"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="load-generator processes (receivers split)"
    )
    p.add_argument(
        "--edge-workers",
        type=int,
        default=None,
        help="Waddle's WADDLE_EDGE_WORKERS in fanout, throughput, join-storm and the others "
        "(hibernation and huge-channel set their own)",
    )
    p.add_argument("--connect-timeout", type=float, default=None)
    p.add_argument(
        "--database-url",
        default=os.environ.get("WADDLE_BENCH_DATABASE_URL") or None,
        help="PostgreSQL for Waddle (default: $WADDLE_BENCH_DATABASE_URL, else SQLite)",
    )
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy Waddle during throughput",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def make_config(args: argparse.Namespace) -> Config:
    cfg = Config()
    if args.smoke:
        cfg = Config(
            fanout_sizes=[20],
            fanout_duration=2.0,
            throughput_members=20,
            throughput_start=20.0,
            throughput_step=1.0,
            throughput_max_rate=20.0,
            many_channels=5,
            many_members=4,
            many_rate=20.0,
            many_duration=2.0,
            connect_total=50,
            connect_channel_size=25,
            connect_concurrency=25,
            idle_seconds=1.0,
            replay_messages=100,
            replay_rounds=1,
            hib_channels=20,
            hib_messages=3,
            hib_rate=60.0,
            hib_idle=1.0,
            hib_cpu_window=1.0,
            hib_wake_channels=10,
            hib_wake_rate=20.0,
            hib_runs=1,
            huge_members=30,
            huge_runs=1,
            huge_duration=1.0,
            huge_rate=2.0,
            huge_settle=0.5,
            huge_loadgen_workers=2,
            storm_members=10,
            storm_joiners=20,
            storm_within=1.0,
            storm_rate=20.0,
            storm_steady=1.0,
            drain=3.0,
            connect_timeout=30.0,
        )
    overrides = {
        "fanout_sizes": args.fanout_sizes,
        "fanout_duration": args.duration,
        "many_duration": args.duration,
        "fanout_rate": args.rate,
        "fanout_users": args.fanout_users,
        "throughput_step": args.step,
        "throughput_members": args.throughput_members,
        "throughput_users": args.throughput_users,
        "storm_members": args.storm_members,
        "storm_joiners": args.storm_joiners,
        "storm_within": args.storm_within,
        "storm_rate": args.storm_rate,
        "throughput_start": args.throughput_start,
        "many_channels": args.many_channels,
        "many_members": args.many_members,
        "many_rate": args.many_rate,
        "connect_total": args.connect_total,
        "idle_seconds": args.idle_seconds,
        "replay_messages": args.replay_messages,
        "hib_channels": args.hib_channels,
        "hib_messages": args.hib_messages,
        "hib_rate": args.hib_rate,
        "hib_idle": args.hib_idle,
        "hib_wake_channels": args.hib_wake_channels,
        "hib_runs": args.hib_runs,
        "huge_members": args.huge_members,
        "huge_runs": args.huge_runs,
        "huge_edge_workers": args.huge_edge_workers,
        "workers": args.workers,
        "edge_workers": args.edge_workers,
        "connect_timeout": args.connect_timeout,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.profile > 0:
        cfg.profile_seconds = args.profile
        cfg.profile_dir = args.out / "profile"
    return cfg


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in load],
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    """HEAD of the work tree (with ``+dirty`` when it has changes), or empty."""
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


Group = Callable[[systems.System, Context], Awaitable[dict[str, Any]]]


def _groups(selected: list[str], cfg: Config) -> list[tuple[str, Group]]:
    out: list[tuple[str, Group]] = []
    if "connect" in selected or "idle" in selected:
        out.append(("connect", scenarios.connect_idle))
    if "fanout" in selected:

        async def fanout_all(system: systems.System, ctx: Context) -> dict[str, Any]:
            runs: dict[str, Any] = {}
            for n in cfg.fanout_sizes:
                ctx.progress.prefix = f"{system.name} fanout N={n}"
                try:
                    runs[str(n)] = await scenarios.fanout(system, ctx, n)
                except LoadError as exc:
                    runs[str(n)] = {"members": n, "error": str(exc)[:500]}
                _say(ctx, runs[str(n)])
                if not system.alive():
                    runs["error"] = "server died"
                    break
            return {"runs": runs}

        out.append(("fanout", fanout_all))
    if "many-channels" in selected:
        out.append(("many-channels", scenarios.many_channels))
    if "throughput" in selected:
        out.append(("throughput", scenarios.throughput))
    if "join-storm" in selected:
        out.append(("join-storm", scenarios.join_storm))
    if "replay" in selected:
        out.append(("replay", scenarios.replay))
    if "hibernation" in selected:
        out.append(("hibernation", _no_shared_system))
    if "huge-channel" in selected:
        out.append(("huge-channel", _no_shared_system))
    return out


async def _no_shared_system(system: systems.System, ctx: Context) -> dict[str, Any]:
    raise AssertionError("the hibernation and huge-channel scenarios start their own systems")


def _edge_env(cfg: Config) -> dict[str, str]:
    """Waddle's environment for the scenarios that take ``--edge-workers``."""
    return {"WADDLE_EDGE_WORKERS": str(cfg.edge_workers)} if cfg.edge_workers > 1 else {}


def _launcher(name: str, tmp: Path, database_url: str | None) -> scenarios.Launcher:
    def launch(
        env: Mapping[str, str] | None, label: str
    ) -> contextlib.AbstractAsyncContextManager[systems.System]:
        return systems.launch(name, tmp / label, database_url, env)

    return launch


def _say(ctx: Context, result: dict[str, Any]) -> None:
    if "error" in result:
        ctx.progress.done(f"error: {result['error']}")
    elif "all_members" in result:
        d, a = result["delivery"], result["all_members"]
        ctx.progress.done(
            f"{result['deliveries']} deliveries ({100 * result['delivered_fraction']:.1f} %), "
            f"delivery p50 {d['p50_ms']:.1f} ms p99 {d['p99_ms']:.1f} ms, "
            f"all-members p50 {a['p50_ms']:.1f} ms p99 {a['p99_ms']:.1f} ms"
        )


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = make_config(args)
    selected_systems = ["waddle"] if args.smoke else args.systems
    runs_wanted = args.runs or (1 if args.smoke else 3)
    progress = Progress(enabled=not args.quiet)
    out: Path = args.out
    os.makedirs(out, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "config": cfg.as_dict(),
        "smoke": bool(args.smoke),
        "database": "postgresql" if args.database_url else "sqlite",
        "runs": [],
        "load": [],
    }
    groups = _groups(args.scenarios, cfg)
    started = time.monotonic()
    profile_seconds = cfg.profile_seconds
    with tempfile.TemporaryDirectory(prefix="waddle-bench-") as tmp_s:
        tmp = Path(tmp_s)
        for r in range(runs_wanted):
            # The profile is taken once (first run); it perturbs the step it samples.
            cfg.profile_seconds = profile_seconds if r == 0 else 0.0
            load_start = _loadavg()
            one = await _one_run(args, cfg, selected_systems, groups, progress, tmp / f"run{r}", r)
            results["runs"].append(one)
            results["load"].append({"run": r + 1, "start": load_start, "end": _loadavg()})
    cfg.profile_seconds = profile_seconds
    view = stats.merge_runs(results["runs"])
    results["systems"] = stats.plain(view)
    results["spread"] = stats.plain(view, spread=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    if cfg.profile_dir is not None:
        results["profile"] = report.profile_summaries(cfg.profile_dir)
    return results


async def _one_run(
    args: argparse.Namespace,
    cfg: Config,
    selected_systems: list[str],
    groups: list[tuple[str, Group]],
    progress: Progress,
    tmp: Path,
    index: int,
) -> dict[str, Any]:
    """Every selected system through every selected scenario, once."""
    runs_wanted = args.runs or (1 if args.smoke else 3)
    tag = f" run {index + 1}/{runs_wanted}" if runs_wanted > 1 else ""
    out: dict[str, Any] = {}
    for name in selected_systems:
        per: dict[str, Any] = {"label": systems.LABELS[name]}
        out[name] = per
        shared: contextlib.AsyncExitStack | None = None
        shared_system: systems.System | None = None
        if args.smoke:
            shared = contextlib.AsyncExitStack()
            shared_system = await shared.enter_async_context(
                systems.launch(name, tmp / name, args.database_url, _edge_env(cfg))
            )
        try:
            for scenario, fn in groups:
                if scenario == "replay" and name != "waddle":
                    per["replay"] = {"error": "not applicable (no persistence)"}
                    continue
                if scenario in ("hibernation", "huge-channel") and index > 0:
                    continue  # they repeat themselves (``--hib-runs``, ``--huge-runs``)
                progress.prefix = f"{name} {scenario}{tag}"
                progress.show("starting", force=True)
                t0 = time.monotonic()
                try:
                    if scenario == "hibernation":
                        per[scenario] = await scenarios.hibernation(
                            name,
                            Context(cfg, progress, tmp / "load"),
                            _launcher(name, tmp / f"{name}-{scenario}", args.database_url),
                        )
                    elif scenario == "huge-channel":
                        per[scenario] = await huge_channel.huge_channel(
                            name,
                            Context(cfg, progress, tmp / "load"),
                            _launcher(name, tmp / f"{name}-{scenario}", args.database_url),
                        )
                    elif shared_system is not None and shared_system.alive():
                        ctx = Context(cfg, progress, tmp / "load")
                        per[scenario] = await fn(shared_system, ctx)
                    else:
                        async with systems.launch(
                            name, tmp / f"{name}-{scenario}", args.database_url, _edge_env(cfg)
                        ) as system:
                            if name == "waddle":
                                per["database"] = system.database
                            ctx = Context(cfg, progress, tmp / "load")
                            per[scenario] = await fn(system, ctx)
                except (LoadError, ServiceFailed, OSError) as exc:
                    per[scenario] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
                per[scenario]["elapsed_s"] = round(time.monotonic() - t0, 1)
                progress.prefix = f"{name} {scenario}{tag}"
                if scenario != "fanout":
                    _say(Context(cfg, progress, tmp), per[scenario])
                progress.done(f"done in {per[scenario]['elapsed_s']:.0f}s")
        finally:
            if shared is not None:
                await shared.aclose()
    return out


def delivered_any(results: dict[str, Any]) -> bool:
    waddle = results["systems"].get("waddle", {})
    for run_ in waddle.get("fanout", {}).get("runs", {}).values():
        if isinstance(run_, dict) and run_.get("deliveries", 0) > 0:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        results = uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        results = asyncio.run(run(args))
    out: Path = args.out
    (out / "results.json").write_bytes(
        orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    if results.get("profile"):
        (out / "profile" / "summary.md").write_text(report.profiles_markdown(results["profile"]))
    plots = report.plots(results, out)
    width = shutil.get_terminal_size((100, 20)).columns
    print("=" * min(width, 100))
    print(markdown)
    print(
        f"results: {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in plots)
    )
    if "fanout" in args.scenarios and "waddle" in results["systems"] and not delivered_any(results):
        print("no message was delivered to any Waddle receiver", file=sys.stderr)
        return 1
    return 0
