"""Turn a results dict into Markdown tables, PNG plots and profile summaries.

Every table shows each system that ran, side by side, with the ratio of its
key number to Waddle's (``x``: for latencies and memory, the peer's value
over Waddle's, so above 1 means Waddle is better; for rates, Waddle's
value over the peer's, so above 1 again means Waddle is better).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench import profile
from bench.systems import LABELS

TARGETS_DOC = "targets of the issue (2-core machine, load generator on the same machine)"


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "-"
    if abs(v) >= 1000 and digits <= 1:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _ratio(value: Any, base: Any, *, higher_is_better: bool = False) -> str:
    try:
        v, b = float(value), float(base)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(v) or math.isnan(b) or v <= 0 or b <= 0:
        return "-"
    r = b / v if higher_is_better else v / b
    return f"{r:.2f}x"


def _lossy(result: dict[str, Any]) -> bool:
    """Fewer than 99.9 % of the expected deliveries arrived: latency is not comparable."""
    return float(result.get("delivered_fraction", 0.0)) < 0.999


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _label(name: str) -> str:
    return LABELS.get(name, name)


def fanout_table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    sizes: list[str] = []
    for per in systems.values():
        for n in per.get("fanout", {}).get("runs", {}):
            if n.isdigit() and n not in sizes:
                sizes.append(n)
    sizes.sort(key=int)
    rows = []
    for n in sizes:
        base = systems.get("waddle", {}).get("fanout", {}).get("runs", {}).get(n, {})
        for name, per in systems.items():
            r = per.get("fanout", {}).get("runs", {}).get(n)
            if r is None:
                continue
            if "error" in r or "delivery" not in r:
                rows.append([n, _label(name), *(["-"] * 9), f"error: {r.get('error', '?')[:80]}"])
                continue
            d, a = r["delivery"], r["all_members"]
            rows.append(
                [
                    n,
                    _label(name),
                    _f(d["p50_ms"]),
                    _f(d["p99_ms"]),
                    _f(d["max_ms"]),
                    _f(a["p50_ms"]),
                    _f(a["p99_ms"]),
                    _f(a["max_ms"]),
                    _f(100 * r["delivered_fraction"], 2),
                    _f(r["connect"]["connect_s"]),
                    "-"
                    if _lossy(r)
                    else _ratio(a["p99_ms"], base.get("all_members", {}).get("p99_ms")),
                    "lost deliveries" if _lossy(r) else "",
                ]
            )
    header = [
        "N",
        "system",
        "delivery p50 ms",
        "p99",
        "max",
        "all-members p50 ms",
        "p99",
        "max",
        "delivered %",
        "connect s",
        "all-members p99 vs Waddle",
        "note",
    ]
    return _table(header, rows)


def throughput_table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    base = (systems.get("waddle", {}).get("throughput", {}) or {}).get("best") or {}
    rows = []
    for name, per in systems.items():
        t = per.get("throughput")
        if t is None:
            continue
        best = t.get("best")
        steps = t.get("steps", [])
        if "error" in t and not steps:
            rows.append([_label(name), "-", "-", "-", "-", "-", f"error: {t['error'][:80]}"])
            continue
        if not best:
            worst = steps[0] if steps else {}
            note = (
                f"no step passed; lowest tried {_f(worst.get('rate'))} msg/s: all-members p99 "
                f"{_f(worst.get('all_members', {}).get('p99_ms'))} ms, "
                f"{_f(100 * worst.get('delivered_fraction', 0), 1)} % delivered"
            )
            rows.append([_label(name), "0", "-", "-", "-", "-", note])
            continue
        fail = next((s for s in steps if not s.get("passed") and s["rate"] > best["rate"]), None)
        note = ""
        if fail is not None:
            note = (
                f"next step {_f(fail['rate'])} msg/s: p99 {_f(fail['all_members']['p99_ms'])} ms, "
                f"{_f(100 * fail['delivered_fraction'], 1)} % delivered"
            )
        rows.append(
            [
                _label(name),
                _f(best["rate"]),
                _f(best["deliveries_per_s"]),
                _f(best["all_members"]["p50_ms"]),
                _f(best["all_members"]["p99_ms"]),
                _ratio(
                    best["deliveries_per_s"], base.get("deliveries_per_s"), higher_is_better=True
                ),
                note,
            ]
        )
    header = [
        "system",
        "best rate msg/s",
        "deliveries/s",
        "all-members p50 ms",
        "p99 ms",
        "Waddle vs it (deliveries/s)",
        "note",
    ]
    return _table(header, rows)


def many_table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    base = systems.get("waddle", {}).get("many-channels", {})
    rows = []
    for name, per in systems.items():
        m = per.get("many-channels")
        if m is None:
            continue
        if "error" in m or "delivery" not in m:
            rows.append([_label(name), *(["-"] * 6), f"error: {str(m.get('error'))[:80]}"])
            continue
        d, a = m["delivery"], m["all_members"]
        rows.append(
            [
                _label(name),
                _f(m["deliveries_per_s"]),
                _f(d["p50_ms"]),
                _f(d["p99_ms"]),
                _f(a["p50_ms"]),
                _f(a["p99_ms"]),
                _f(100 * m["delivered_fraction"], 2),
                "-"
                if _lossy(m)
                else _ratio(a["p99_ms"], base.get("all_members", {}).get("p99_ms")),
            ]
        )
    header = [
        "system",
        "deliveries/s",
        "delivery p50 ms",
        "p99",
        "all-members p50 ms",
        "p99",
        "delivered %",
        "all-members p99 vs Waddle",
    ]
    return _table(header, rows)


def connect_table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    base = systems.get("waddle", {}).get("connect", {}).get("connect", {})
    rows = []
    for name, per in systems.items():
        c = per.get("connect")
        if c is None:
            continue
        if "connect" not in c:
            rows.append(
                [_label(name), "-", "-", "-", "-", "-", f"error: {str(c.get('error'))[:80]}"]
            )
            continue
        cc = c["connect"]
        rows.append(
            [
                _label(name),
                f"{cc['connected']}/{cc.get('target', '?')}",
                _f(cc["connects_per_s"]),
                _f(cc["connect_p50_ms"]),
                _f(cc["connect_p99_ms"]),
                _ratio(cc["connects_per_s"], base.get("connects_per_s"), higher_is_better=True),
                (f"{cc['failures']} failed: {cc['first_error'][:60]}" if cc["failures"] else ""),
            ]
        )
    header = [
        "system",
        "connected",
        "connects/s",
        "p50 ms",
        "p99 ms",
        "Waddle vs it (rate)",
        "note",
    ]
    return _table(header, rows)


def idle_table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    base = systems.get("waddle", {}).get("connect", {}).get("idle", {})
    rows = []
    for name, per in systems.items():
        i = (per.get("connect") or {}).get("idle")
        if i is None:
            continue
        cpu = i["cpu_percent"]
        server = ", ".join(
            f"{k} {_f(v, 2)} %" for k, v in cpu.items() if not k.startswith("loadgen")
        )
        rows.append(
            [
                _label(name),
                str(i["connections"]),
                _f(i["rss_per_connection_kb"], 1),
                _f(i["edge_rss_after_mb"], 0),
                server,
                _ratio(i["rss_per_connection_kb"], base.get("rss_per_connection_kb")),
            ]
        )
    header = [
        "system",
        "idle connections",
        "RSS KB / connection",
        "socket process RSS MB",
        "CPU while idle (% of one core)",
        "RSS vs Waddle",
    ]
    return _table(header, rows)


def replay_table(results: dict[str, Any]) -> str:
    rows = []
    for name, per in results["systems"].items():
        r = per.get("replay")
        if r is None:
            continue
        if "error" in r:
            rows.append([_label(name), "-", "-", "-", "-", r["error"]])
            continue
        rows.append(
            [
                _label(name),
                str(r["messages"]),
                _f(r["p50_ms"]),
                _f(r["max_ms"]),
                _f(r["messages_per_s"]),
                f"rounds {r['rounds']}, replayed {r['replayed_counts']}",
            ]
        )
    header = [
        "system",
        "missed messages",
        "sync → sync_complete p50 ms",
        "max ms",
        "messages/s",
        "note",
    ]
    return _table(header, rows)


def _spread(d: Any, digits: int = 1) -> str:
    """``median (min-max)`` of a summary entry, or ``-``."""
    if not isinstance(d, dict):
        return "-"
    if d["min"] == d["max"]:
        return _f(d["median"], digits)
    return f"{_f(d['median'], digits)} ({_f(d['min'], digits)} to {_f(d['max'], digits)})"


def hibernation_tables(results: dict[str, Any]) -> list[str]:
    """The hibernation scenario: memory, wake, restart, and idle cost side by side."""
    cfg = results["config"]
    systems = results["systems"]
    w = (systems.get("waddle") or {}).get("hibernation") or {}
    summ = w.get("summary") or {}
    parts: list[str] = []
    modes = [("on", f"on ({_f(cfg['hib_idle'])} s)"), ("off", "off (0)")]
    if summ:
        runs = summ.get("on", summ.get("off", {})).get("runs", 0)
        parts.append(
            f"Median of {runs} run(s), (min to max) when they differ. {cfg['hib_channels']} "
            f"channels x 2 members (one identity per connection), {cfg['hib_messages']} "
            f"messages per channel at {_f(cfg['hib_rate'])} msg/s, then idle for "
            f"{_f(3 * cfg['hib_idle'])} s (CPU over the last {_f(cfg['hib_idle'])} s)."
        )
        rows = []
        for mode, label in modes:
            m = summ.get(mode)
            if not m:
                continue
            rows.append(
                [
                    label,
                    _spread(m["channel_loaded_mb"]),
                    _spread(m["channel_idle_mb"]),
                    _spread(m["channel_above_baseline_mb"]),
                    _spread(m["asleep"], 0),
                    _spread(m["socket_rss_per_connection_kb"]),
                    _spread(m["idle_cpu_max_percent"], 2),
                ]
            )
        parts.append(
            _table(
                [
                    "hibernation",
                    "channel RSS after traffic MB",
                    "after idle MB",
                    "above empty baseline MB",
                    "channels asleep",
                    "edge RSS KB / connection",
                    "CPU while idle, busiest process %",
                ],
                rows,
            )
        )
        saving = summ.get("channel_rss_saving_percent")
        if saving:
            parts.append(
                f"Channel-service RSS above its empty baseline, hibernation on vs off: "
                f"**{_spread(saving)} % less**."
            )
        on = summ.get("on") or {}
        if on.get("wake_p99_ms"):
            parts.append(
                _table(
                    [
                        f"first message into {cfg['hib_wake_channels']} channels",
                        "p50 ms",
                        "p99 ms",
                    ],
                    [
                        [
                            "asleep (wakes them)",
                            _spread(on["wake_p50_ms"]),
                            _spread(on["wake_p99_ms"]),
                        ],
                        [
                            "the same channels, awake",
                            _spread(on["awake_p50_ms"]),
                            _spread(on["awake_p99_ms"]),
                        ],
                        ["added by waking, at p99", "", _spread(on["wake_added_p99_ms"])],
                    ],
                )
            )
        rows = []
        for mode, label in modes:
            m = summ.get(mode)
            if m and m.get("restart_registered_s"):
                rows.append(
                    [
                        label,
                        _spread(m["restart_registered_s"], 2),
                        _spread(m["restart_full_loads"], 0),
                        _spread(m["restart_head_checks"], 0),
                    ]
                )
        if rows:
            parts.append(
                _table(
                    [
                        f"shard restart, {2 * cfg['hib_channels']} connections re-registered",
                        "until all registered s",
                        "full channel loads",
                        "head reads (no messages)",
                    ],
                    rows,
                )
            )
    # Idle cost side by side.
    rows = []
    for name, per in systems.items():
        h = (per.get("hibernation") or {}).get("summary") or {}
        for mode, label in modes if name == "waddle" else [("-", "")]:
            m = h.get(mode)
            if not m:
                continue
            above = m["channel_above_baseline_mb"] if name == "waddle" else None
            rows.append(
                [
                    _label(name) + (f", hibernation {label}" if label else ""),
                    _spread(m["socket_rss_per_connection_kb"]),
                    _spread(above),
                    _spread(m["idle_cpu_max_percent"], 2),
                ]
            )
    if rows:
        parts.append(
            _table(
                [
                    f"idle cost, {2 * cfg['hib_channels']} connections after the traffic",
                    "socket process RSS KB / connection",
                    "channel service above empty MB",
                    "CPU while idle, busiest process %",
                ],
                rows,
            )
        )
    return parts


def targets(results: dict[str, Any]) -> str:
    w = results["systems"].get("waddle")
    if not w:
        return ""
    runs = w.get("fanout", {}).get("runs", {})
    r1000, r10000 = runs.get("1000", {}), runs.get("10000", {})
    best = (w.get("throughput") or {}).get("best") or {}
    idle = (w.get("connect") or {}).get("idle") or {}
    rows: list[list[str]] = []

    def add(what: str, target: str, value: float | None, ok: bool | None) -> None:
        verdict = "-" if ok is None else ("met" if ok else "missed")
        rows.append([what, target, "-" if value is None else _f(value), verdict])

    def get(d: dict[str, Any], *path: str) -> float | None:
        cur: Any = d
        for key in path:
            if not isinstance(cur, dict) or key not in cur:
                return None
            cur = cur[key]
        try:
            v = float(cur)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(v) else v

    v = get(r1000, "delivery", "p50_ms")
    add("fanout N=1000: per-delivery p50", "≤ 15 ms", v, None if v is None else v <= 15)
    v = get(r1000, "all_members", "p99_ms")
    add("fanout N=1000: all-members p99", "≤ 50 ms", v, None if v is None else v <= 50)
    v = get(best, "deliveries_per_s")
    p = get(best, "all_members", "p99_ms")
    add(
        "throughput N=1000: deliveries/s (all-members p99 < 100 ms)",
        "≥ 200,000",
        v,
        None if v is None else v >= 200_000 and (p or 0) < 100,
    )
    v = get(r10000, "all_members", "p50_ms")
    add("fanout N=10000: all-members p50", "≤ 120 ms", v, None if v is None else v <= 120)
    v = get(idle, "rss_per_connection_kb")
    add("idle: edge RSS per connection (KB)", "≤ 16", v, None if v is None else v <= 16)
    cpu = idle.get("cpu_percent", {}) if idle else {}
    server_cpu = [float(x) for k, x in cpu.items() if not k.startswith("loadgen") and x == x]
    v = max(server_cpu) if server_cpu else None
    add("idle: CPU of each server process (%)", "≤ 1", v, None if v is None else v <= 1)
    floor = results["systems"].get("floor", {}).get("fanout", {}).get("runs", {}).get("1000", {})
    fv = get(floor, "all_members", "p99_ms")
    wv = get(r1000, "all_members", "p99_ms")
    ratio = wv / fv if (wv is not None and fv) else None
    add(
        "fanout N=1000: all-members p99 vs the floor (x)",
        "≤ 1.5x",
        ratio,
        None if ratio is None else ratio <= 1.5,
    )
    hib = ((w.get("hibernation") or {}).get("summary")) or {}
    saving = (hib.get("channel_rss_saving_percent") or {}).get("median")
    add(
        "hibernation: channel-service RSS above empty, on vs off (% less)",
        "≥ 90",
        saving,
        None if saving is None else saving >= 90,
    )
    cpu_on = ((hib.get("on") or {}).get("idle_cpu_max_percent") or {}).get("median")
    add(
        "hibernation: CPU of every process while idle (%)",
        "≤ 1",
        cpu_on,
        None if cpu_on is None else cpu_on <= 1,
    )
    added = ((hib.get("on") or {}).get("wake_added_p99_ms") or {}).get("median")
    add(
        "hibernation: waking adds at p99 (ms)",
        "≤ 50",
        added,
        None if added is None else added <= 50,
    )
    return _table(["target", "wanted", "measured", "verdict"], rows)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    parts = [
        f"Run {m['date']} on {m['host']} ({m['cpus']} CPUs, {m['cpu_model']}), Python "
        f"{m['python']}, commit {m.get('commit') or '?'}; load average at start "
        f"{m['load_average_at_start']}. Waddle database: "
        f"{results['database']}. Total {results.get('elapsed_s', 0):.0f} s.",
    ]
    if results.get("smoke"):
        parts.append("**Smoke run** (tiny sizes; numbers mean nothing).")
    t = targets(results)
    if t:
        parts += ["### Targets", t]
    if any("fanout" in p for p in results["systems"].values()):
        parts += [
            f"### Fanout — one channel, N receivers, one sender at {_f(cfg['fanout_rate'])} msg/s, "
            f"{cfg['content_size']}-byte content, {_f(cfg['fanout_duration'])} s",
            fanout_table(results),
        ]
    if any("throughput" in p for p in results["systems"].values()):
        parts += [
            f"### Throughput — N = {cfg['throughput_members']}, rate ramped in "
            f"{_f(cfg['throughput_step'])} s steps until all-members p99 > "
            f"{_f(cfg['throughput_limit_ms'])} ms",
            throughput_table(results),
        ]
    if any("many-channels" in p for p in results["systems"].values()):
        parts += [
            f"### Many channels — {cfg['many_channels']} channels x {cfg['many_members']} members, "
            f"{_f(cfg['many_rate'])} msg/s in total, {_f(cfg['many_duration'])} s",
            many_table(results),
        ]
    if any("connect" in p for p in results["systems"].values()):
        parts += [
            f"### Connect — {cfg['connect_total']} connections ({cfg['connect_channel_size']} per "
            f"channel), {cfg['connect_concurrency']} in flight, until the first frame "
            "(`initial_state`)",
            connect_table(results),
            f"### Idle — the same connections held for {_f(cfg['idle_seconds'])} s",
            idle_table(results),
        ]
    if any("replay" in p for p in results["systems"].values()):
        parts += ["### Replay — `sync` after missed messages", replay_table(results)]
    if any("hibernation" in p for p in results["systems"].values()):
        parts += ["### Hibernation", *hibernation_tables(results)]
    prof = results.get("profile")
    if prof:
        parts.append("### Profile (py-spy, throughput scenario)")
        for role, summary in prof.items():
            parts.append(profile_markdown(role, summary))
    return "\n\n".join(parts) + "\n"


def profile_summaries(directory: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not directory.exists():
        return out
    for path in sorted(directory.glob("*.txt")):
        out[path.stem] = profile.summarize(path.read_text(errors="replace"))
    return out


def profile_markdown(role: str, summary: dict[str, Any]) -> str:
    rows = [[name, f"{pct:.1f}"] for name, pct in summary["self"][:12]]
    incl = [[name, f"{pct:.1f}"] for name, pct in summary["inclusive"][:12]]
    return (
        f"**{role}** ({summary['samples']} samples)\n\n"
        + _table(["self (top of stack)", "%"], rows)
        + "\n\n"
        + _table(["inclusive", "%"], incl)
    )


def _save(fig: Any, path: Path | None, written: list[Path]) -> None:
    """Write ``fig`` to ``path`` (when it has something to show) and free it."""
    import matplotlib.pyplot as plt

    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots; returns the files written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a bench dependency
        return []
    written: list[Path] = []
    systems = results["systems"]

    # Fanout: all-members p50/p99 against N.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drew = False
    for name, per in systems.items():
        runs = per.get("fanout", {}).get("runs", {})
        pts = sorted(
            (int(n), r["all_members"]["p50_ms"], r["all_members"]["p99_ms"])
            for n, r in runs.items()
            if n.isdigit() and isinstance(r, dict) and "all_members" in r
        )
        if not pts:
            continue
        xs = [p[0] for p in pts]
        line = ax.plot(xs, [p[2] for p in pts], marker="o", label=f"{_label(name)} p99")[0]
        ax.plot(
            xs,
            [p[1] for p in pts],
            marker="x",
            ls="--",
            color=line.get_color(),
            label=f"{_label(name)} p50",
        )
        drew = True
    if drew:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("receivers in the channel")
        ax.set_ylabel("all-members latency (ms)")
        ax.set_title("Fanout: time until every member has a message")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out / "fanout.png" if drew else None, written)

    # Fanout N=1000: delivery latency CDF.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drew = False
    for name, per in systems.items():
        r = per.get("fanout", {}).get("runs", {}).get("1000")
        if not isinstance(r, dict) or not r.get("delivery_cdf_ms"):
            continue
        cdf = r["delivery_cdf_ms"]
        ys = [i / (len(cdf) - 1) for i in range(len(cdf))]
        ax.plot(cdf, ys, label=_label(name))
        drew = True
    if drew:
        ax.set_xscale("log")
        ax.set_xlabel("per-delivery latency (ms)")
        ax.set_ylabel("fraction of deliveries")
        ax.set_title("Fanout N=1000: per-delivery latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out / "fanout_cdf_1000.png" if drew else None, written)

    # Throughput ramp: all-members p99 against deliveries/s.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drew = False
    for name, per in systems.items():
        steps = (per.get("throughput") or {}).get("steps") or []
        ramp: list[tuple[float, float]] = sorted(
            (float(s["deliveries_per_s"]), float(s["all_members"]["p99_ms"]))
            for s in steps
            if s["all_members"]["p99_ms"] == s["all_members"]["p99_ms"]
        )
        if not ramp:
            continue
        ax.plot([p[0] for p in ramp], [p[1] for p in ramp], marker="o", label=_label(name))
        drew = True
    if drew:
        limit = results["config"]["throughput_limit_ms"]
        ax.axhline(limit, color="grey", ls=":", label=f"{limit:.0f} ms limit")
        ax.set_yscale("log")
        ax.set_xlabel("deliveries per second")
        ax.set_ylabel("all-members p99 (ms)")
        ax.set_title(f"Throughput ramp, N = {results['config']['throughput_members']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out / "throughput.png" if drew else None, written)

    # Connect rate and idle memory.
    names = [n for n, p in systems.items() if (p.get("connect") or {}).get("idle")]
    if names:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
        rates = [systems[n]["connect"]["connect"]["connects_per_s"] for n in names]
        kb = [systems[n]["connect"]["idle"]["rss_per_connection_kb"] for n in names]
        labels = [_label(n).split(" (")[0].replace(" + Redis", "") for n in names]
        ax1.bar(labels, rates)
        ax1.set_title("connections per second")
        ax2.bar(labels, kb)
        ax2.set_title("RSS KB per idle connection")
        for a in (ax1, ax2):
            a.tick_params(axis="x", labelsize=7, rotation=15)
            a.grid(True, axis="y", alpha=0.3)
        _save(fig, out / "connect_idle.png", written)

    # Hibernation: channel-service RSS over the idle period, on and off.
    runs = ((systems.get("waddle") or {}).get("hibernation") or {}).get("runs") or []
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drew = False
        for mode, style in (("on", "-"), ("off", "--")):
            one = runs[0].get(mode) or {}
            timeline = one.get("rss_timeline_mb") or []
            if not timeline:
                continue
            base = one["baseline_rss_mb"]["channel"]
            ax.plot(
                [p["t"] for p in timeline],
                [p["channel"] - base for p in timeline],
                ls=style,
                label=f"hibernation {mode}",
            )
            drew = True
        if drew:
            ax.axvline(results["config"]["hib_idle"], color="grey", ls=":", label="idle period")
            ax.set_xlabel("seconds since the last message")
            ax.set_ylabel("channel service RSS above empty (MB)")
            ax.set_title("Hibernation: what an idle shard keeps")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        _save(fig, out / "hibernation.png" if drew else None, written)
    return written
