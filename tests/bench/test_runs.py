"""Repeated runs: medians with their spread, per-run ratios to the floors,
server CPU per delivery, and the flame graph of a profile."""

from __future__ import annotations

import asyncio
import sys
import xml.etree.ElementTree as ET

import pytest

from bench import report
from bench.cli import build_parser
from bench.profile import flamegraph_svg
from bench.stats import Spread, cpu_us_per_delivery, merge_runs, plain


def test_merge_takes_median_min_max_of_numbers_and_first_of_the_rest() -> None:
    runs = [
        {"best": {"rate": 100.0, "label": "a"}, "steps": [1], "lost": float("nan")},
        {"best": {"rate": 300.0, "label": "b"}, "steps": [2, 3], "lost": 2.0},
        {"best": {"rate": 200.0}, "extra": 5},
    ]
    view = merge_runs(runs)
    rate = view["best"]["rate"]
    assert isinstance(rate, Spread)
    assert (float(rate), rate.lo, rate.hi, rate.n) == (200.0, 100.0, 300.0, 3)
    assert view["best"]["label"] == "a"
    assert view["steps"] == [1]
    assert view["lost"].n == 1 and float(view["lost"]) == 2.0  # NaN left out
    assert float(view["extra"]) == 5
    assert plain(view)["best"]["rate"] == 200.0
    assert plain(view, spread=True)["best"]["rate"] == {
        "median": 200.0,
        "min": 100.0,
        "max": 300.0,
        "runs": 3,
    }


def test_spread_scales_and_renders_its_range() -> None:
    s = Spread([0.5, 0.25, 0.75])
    pct = 100 * s
    assert isinstance(pct, Spread) and (pct.lo, pct.hi) == (25.0, 75.0)
    assert report._f(pct) == "50.0 (25.0 to 75.0)"
    assert report._f(Spread([3.0, 3.0])) == "3.0"


def test_cpu_per_delivery_counts_server_processes_only() -> None:
    step = {
        "cpu_percent": {"edge": 50.0, "store": 25.0, "loadgen0": 90.0},
        "window_s": 2.0,
        "deliveries": 100_000,
    }
    assert cpu_us_per_delivery(step) == pytest.approx(15.0)
    assert cpu_us_per_delivery({**step, "deliveries": 0}) is None


def _step(rate: float, cpu: float, fraction: float = 1.0) -> dict[str, object]:
    return {
        "rate": rate,
        "cpu_percent": {"server": cpu},
        "window_s": 1.0,
        "deliveries": 1000,
        "delivered_fraction": fraction,
        "passed": True,
    }


def test_cpu_ratios_compare_rates_both_ran_without_loss() -> None:
    run = {
        "waddle": {"throughput": {"steps": [_step(25, 20), _step(40, 30), _step(64, 9, 0.5)]}},
        "floor": {"throughput": {"steps": [_step(25, 10), _step(40, 40), _step(64, 3)]}},
    }
    assert report.cpu_ratios(run) == {25.0: 2.0, 40.0: 0.75}


def test_targets_are_ratios_taken_within_each_run() -> None:
    def run(w: float, f: float) -> dict[str, object]:
        return {
            "waddle": {"throughput": {"best": {"deliveries_per_s": w}}},
            "floor": {"throughput": {"best": {"deliveries_per_s": f}}},
        }

    # Ratios 0.5, 1.0 and 2.0: the median of the ratios, not of the rates.
    results = {"runs": [run(100, 200), run(300, 300), run(800, 400)]}
    results["systems"] = plain(merge_runs(results["runs"]))
    table = report.targets(results)
    line = next(x for x in table.splitlines() if "ceiling / the prepared floor" in x)
    assert "1.00 (0.50 to 2.00)x" in line
    assert "| met |" in line


def test_runs_must_be_positive() -> None:
    assert build_parser().parse_args(["--runs", "5"]).runs == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--runs", "0"])


def test_flame_graph_boxes_are_proportional_to_samples() -> None:
    text = "main (a.py:1);hot (a.py:5) 30\nmain (a.py:1);cold (a.py:9) 10\n"
    svg = flamegraph_svg(text, title="edge", width=400)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    widths: dict[str, float] = {}
    for g in root.iter(f"{ns}g"):
        title, rect = g.find(f"{ns}title"), g.find(f"{ns}rect")
        assert title is not None and title.text and rect is not None
        widths[title.text.split(" (")[0]] = float(rect.get("width", "nan"))
    assert widths == {"a.py:main": 400.0, "a.py:hot": 300.0, "a.py:cold": 100.0}


def test_edge_workers_reach_waddle_and_their_cpu_is_counted() -> None:
    from bench.cli import _edge_env, make_config
    from bench.systems import System

    assert _edge_env(make_config(build_parser().parse_args([]))) == {}
    cfg = make_config(build_parser().parse_args(["--edge-workers", "2"]))
    assert cfg.edge_workers == 2 and _edge_env(cfg) == {"WADDLE_EDGE_WORKERS": "2"}
    # A peer has no edge: its processes are what it started.
    assert System("floor", "floor", "", extra_pids={"server": 1}).pids() == {"server": 1}


async def test_with_edge_workers_the_supervisor_is_named_and_profiles_have_no_spaces() -> None:
    import psutil

    from bench import profile
    from bench.systems import System
    from waddle_common.supervise import Service

    child = "import os, time; time.sleep(60)"
    parent = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}],"
        " env={**os.environ, 'WADDLE_EDGE_ID': 'bench-edge-w0'})\n"
        "print('started', flush=True)\n"
        "try:\n    time.sleep(60)\nfinally:\n    p.kill()\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", parent, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        edge = Service("edge", "edge", {}, proc, {}, None)
        system = System("waddle", "waddle", "", services=[edge])
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"started\n"
        pids = system.pids()
        worker = psutil.Process(proc.pid).children()[0].pid
        assert pids == {"edge supervisor": proc.pid, "edge bench-edge-w0": worker}
        assert [profile.file_stem(role) for role in pids] == [
            "edge-supervisor",
            "edge-bench-edge-w0",
        ]
    finally:
        for p in psutil.Process(proc.pid).children():
            p.kill()
        proc.kill()
        await proc.wait()
