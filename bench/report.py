"""Turn a results dict into Markdown tables, PNG plots and profile summaries.

Every figure is the median over the runs with its min to max beside it
(``median (min to max)``, a single number when they agree). Every table shows
each system that ran, side by side, with the ratio of its key number to
Waddle's (``x``: for latencies and memory, the peer's value over Waddle's,
so above 1 means Waddle is better; for rates, Waddle's value over the
peer's, so above 1 again means Waddle is better). The targets are ratios
of Waddle to the two floors, each ratio taken within one run (the floors
ran minutes apart from Waddle on the same machine) and then summarised
over the runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import huge_channel, profile
from bench.stats import Spread, cpu_us_per_delivery, merge_runs
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
    if (
        isinstance(value, Spread)
        and value.n > 1
        and _one(value.lo, digits) != _one(value.hi, digits)
    ):
        return f"{_one(v, digits)} ({_one(value.lo, digits)} to {_one(value.hi, digits)})"
    return _one(v, digits)


def _one(v: float, digits: int) -> str:
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
                _f(best.get("server_cpu_us_per_delivery"), 2),
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
        "server CPU µs / delivery",
        "Waddle vs it (deliveries/s)",
        "note (first run)",
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


def _cpu_window(cfg: dict[str, Any]) -> float:
    """The hibernation scenario's idle CPU window (older results: one idle period)."""
    return float(max(cfg["hib_idle"], cfg.get("hib_cpu_window", cfg["hib_idle"])))


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
            f"{_f(2 * cfg['hib_idle'] + _cpu_window(cfg))} s (CPU over the last "
            f"{_f(_cpu_window(cfg))} s)."
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
        kept = (summ.get("on") or {}).get("dormant_bytes_per_channel")
        if kept:
            parts.append(f"A sleeping channel's record takes {_spread(kept, 0)} bytes.")
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


def _get(d: Any, *path: str) -> float | None:
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


def _runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The systems of every run (one run for results without repetitions)."""
    return list(results.get("runs") or [results["systems"]])


def _over_runs(
    results: dict[str, Any], fn: Callable[[dict[str, Any]], float | None]
) -> Spread | None:
    """``fn`` of each run's systems, as a median with its spread (None when no run had it)."""
    values = [v for v in (fn(r) for r in _runs(results)) if v is not None and v == v]
    return Spread(values) if values else None


def _ratio_in_run(
    name: str, *path: str, floor: str = "floor"
) -> Callable[[dict[str, Any]], float | None]:
    def fn(run: dict[str, Any]) -> float | None:
        w = _get(run.get("waddle"), *path)
        f = _get(run.get(floor), *path)
        return w / f if w is not None and f else None

    return fn


def _passed(step: dict[str, Any]) -> bool:
    return bool(step.get("passed"))


def cpu_ratios(run: dict[str, Any], floor: str = "floor") -> dict[float, float]:
    """Waddle's server CPU per delivery over the floor's, at every rate both
    delivered (nearly) everything at, within one run."""

    def by_rate(name: str) -> dict[float, float]:
        steps = ((run.get(name) or {}).get("throughput") or {}).get("steps") or []
        out: dict[float, float] = {}
        for st in steps:
            cpu = cpu_us_per_delivery(st)
            if cpu is not None and float(st.get("delivered_fraction", 0)) >= 0.999:
                out[round(float(st["rate"]), 1)] = cpu
        return out

    w, f = by_rate("waddle"), by_rate(floor)
    return {rate: w[rate] / f[rate] for rate in sorted(w) if rate in f and f[rate] > 0}


def _worst_cpu_ratio(run: dict[str, Any]) -> float | None:
    ratios = cpu_ratios(run)
    return max(ratios.values()) if ratios else None


def targets(results: dict[str, Any]) -> str:
    w = results["systems"].get("waddle")
    if not w:
        return ""
    idle = (w.get("connect") or {}).get("idle") or {}
    rows: list[list[str]] = []

    def add(what: str, target: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        verdict = "-" if ok is None else ("met" if ok else "missed")
        rows.append([what, target, "-" if value is None else _f(value, 2) + unit, verdict])

    def ratio_row(
        what: str, target: str, value: Spread | None, limit: float, *, at_least: bool
    ) -> None:
        ok = None if value is None else (value >= limit if at_least else value <= limit)
        add(what, target, value, ok, "x")

    ratio_row(
        "throughput N=1000 (distinct users): Waddle's ceiling / the prepared floor's "
        "(all-members p99 < 100 ms, nothing lost)",
        "≥ 1.0x",
        _over_runs(results, _ratio_in_run("floor", "throughput", "best", "deliveries_per_s")),
        1.0,
        at_least=True,
    )
    v = _over_runs(
        results,
        _ratio_in_run("plain", "throughput", "best", "deliveries_per_s", floor="plain"),
    )
    add("throughput N=1000: Waddle's ceiling / the plain floor's", "(for scale)", v, None, "x")
    ratio_row(
        "throughput N=1000: server CPU per delivery, Waddle / the prepared floor, "
        "worst rate both ran",
        "≤ 1.0x at every rate",
        _over_runs(results, _worst_cpu_ratio),
        1.0,
        at_least=False,
    )
    ratio_row(
        "fanout N=10000 at 10 msg/s: all-members p50, Waddle / the prepared floor",
        "≤ 1.2x",
        _over_runs(
            results, _ratio_in_run("floor", "fanout", "runs", "10000", "all_members", "p50_ms")
        ),
        1.2,
        at_least=False,
    )
    ratio_row(
        "join storm: all-members p99 while 1000 users join in 2 s / steady p99 "
        "(Waddle, everyone in)",
        "≤ 2.0x",
        _over_runs(results, lambda r: _get(r.get("waddle"), "join-storm", "storm_vs_steady_p99")),
        2.0,
        at_least=False,
    )
    ratio_row(
        "fanout N=1000: all-members p99, Waddle / the prepared floor",
        "≤ 1.5x",
        _over_runs(
            results, _ratio_in_run("floor", "fanout", "runs", "1000", "all_members", "p99_ms")
        ),
        1.5,
        at_least=False,
    )
    u = _get(idle, "rss_per_connection_kb")
    add("idle: edge RSS per connection (KB)", "≤ 16", u, None if u is None else u <= 16)
    cpu = idle.get("cpu_percent", {}) if idle else {}
    server_cpu = [float(x) for k, x in cpu.items() if not k.startswith("loadgen") and x == x]
    u = max(server_cpu) if server_cpu else None
    add("idle: CPU of each server process (%)", "≤ 1", u, None if u is None else u <= 1)
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
    return _table(
        ["target", "wanted", "measured: median (min to max) of the runs", "verdict"], rows
    )


def cpu_table(results: dict[str, Any]) -> str:
    """Server CPU per delivery at each rate of the first run's ramps, and the ratios."""
    run = _runs(results)[0]
    rates: list[float] = []
    per: dict[str, dict[float, float]] = {}
    for name, data in run.items():
        steps = ((data or {}).get("throughput") or {}).get("steps") or []
        per[name] = {}
        for st in steps:
            cpu = cpu_us_per_delivery(st)
            if cpu is None or float(st.get("delivered_fraction", 0)) < 0.999:
                continue
            rate = round(float(st["rate"]), 1)
            per[name][rate] = cpu
            if rate not in rates:
                rates.append(rate)
    names = [n for n in per if per[n]]
    if not names:
        return ""
    # Waddle's share of each process, to show where its CPU goes.
    roles: dict[float, dict[str, float]] = {}
    for st in ((run.get("waddle") or {}).get("throughput") or {}).get("steps") or []:
        if st.get("deliveries") and st.get("window_s"):
            scale = float(st["window_s"]) / float(st["deliveries"]) * 1e4
            roles[round(float(st["rate"]), 1)] = {
                k: float(v) * scale
                for k, v in (st.get("cpu_percent") or {}).items()
                if not k.startswith("loadgen") and v == v
            }
    role_names = sorted({k for r in roles.values() for k in r})
    rows = []
    ratios = cpu_ratios(run)
    for rate in sorted(rates):
        row = [_f(rate)]
        row += [_f(per[n].get(rate), 2) for n in names]
        r = ratios.get(rate)
        row.append("-" if r is None else f"{r:.2f}x")
        row += [_f(roles.get(rate, {}).get(k), 2) for k in role_names]
        rows.append(row)
    header = [
        "rate msg/s",
        *[f"{_label(n)} µs" for n in names],
        "Waddle / prepared floor",
        *[f"Waddle {k} µs" for k in role_names],
    ]
    return _table(header, rows)


def storm_table(results: dict[str, Any]) -> str:
    rows = []
    for name, per in results["systems"].items():
        st = per.get("join-storm")
        if st is None:
            continue
        if "storm" not in st:
            rows.append([_label(name), *(["-"] * 8), f"error: {str(st.get('error'))[:80]}"])
            continue
        join = st["storm"].get("join") or {}
        rows.append(
            [
                _label(name),
                _f(st["steady"]["all_members"]["p50_ms"]),
                _f(st["steady"]["all_members"]["p99_ms"]),
                _f(st["storm"]["all_members"]["p50_ms"]),
                _f(st["storm"]["all_members"]["p99_ms"]),
                _f(st["after"]["all_members"]["p99_ms"]),
                _f(st.get("storm_vs_steady_p99"), 2),
                _f(st.get("storm_vs_before_p99"), 2),
                f"{_f(join.get('joined'), 0)}/{_f(join.get('count'), 0)} in "
                f"{_f((join.get('last_joined_ms') or math.nan) / 1000, 2)} s",
                "lost deliveries" if _lossy(st["storm"]) else "",
            ]
        )
    header = [
        "system",
        "before: all-members p50 ms",
        "p99",
        "during the storm p50 ms",
        "p99",
        "steady, everyone in p99",
        "storm p99 / steady p99 (everyone in)",
        "storm p99 / p99 before",
        "joined (last ready at)",
        "note",
    ]
    return _table(header, rows)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    runs = _runs(results)
    # Every table reads the merged view: medians that carry their min-max.
    results = {**results, "systems": merge_runs(runs)}
    load = "; ".join(
        f"run {x['run']}: {x['start']} at its start, {x['end']} at its end"
        for x in results.get("load") or []
    )
    parts = [
        f"Run {m['date']} on {m['host']} ({m['cpus']} CPUs, {m['cpu_model']}), Python "
        f"{m['python']}, commit {m.get('commit') or '?'}; load average at start "
        f"{m['load_average_at_start']}. Waddle database: "
        f"{results['database']}. Total {results.get('elapsed_s', 0):.0f} s. "
        f"{len(runs)} run(s): every figure is the median, (min to max) of the runs when "
        "they differ.",
    ]
    if load:
        parts.append(f"Load average (1, 5, 15 min): {load}.")
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
        cpu = cpu_table(results)
        if cpu:
            parts += [
                "Server CPU per delivery (every server process; PostgreSQL not counted) at "
                "each rate of the first run's ramps where nothing was lost:",
                cpu,
            ]
    if any("join-storm" in p for p in results["systems"].values()):
        parts += [
            f"### Join storm — {cfg['storm_members']} members (distinct users) and a sender at "
            f"{_f(cfg['storm_rate'])} msg/s; {cfg['storm_joiners']} more distinct users join "
            f"within {_f(cfg['storm_within'])} s; latency over the members there before",
            storm_table(results),
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
    if any("huge-channel" in p for p in results["systems"].values()):
        parts.append(huge_channel.markdown(results))
    prof = results.get("profile")
    if prof:
        parts.append(
            "### Profile (py-spy, first run: throughput at the best passing rate; "
            "join-storm/ during the storm) — flame graphs: "
            + ", ".join(f"[{role}](profile/{role}.svg)" for role in prof)
        )
        for role, summary in prof.items():
            parts.append(profile_markdown(role, summary))
    return "\n\n".join(parts) + "\n"


def profile_summaries(directory: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not directory.exists():
        return out
    for path in sorted(directory.rglob("*.txt")):
        role = path.relative_to(directory).with_suffix("").as_posix()
        out[role] = profile.summarize(path.read_text(errors="replace"))
    return out


def profiles_markdown(summaries: dict[str, Any]) -> str:
    """Every profile's summary, with its flame graph beside it (``profile/summary.md``)."""
    parts = ["# py-spy profiles (collapsed stacks `*.txt`, flame graphs `*.svg`)"]
    for role, summary in summaries.items():
        parts += [f"[{role}.svg]({role}.svg)", profile_markdown(role, summary)]
    return "\n\n".join(parts) + "\n"


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


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json``: print the tables of a saved run again."""
    import sys

    import orjson

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS.json", file=sys.stderr)
        return 2
    print(markdown(orjson.loads(Path(args[0]).read_bytes())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
