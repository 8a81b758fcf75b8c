"""``python -m bench --smoke`` against the real stack, as CI runs it.

It must finish quickly, write results with every scenario and deliver
messages; no timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"{module} is missing: install the bench extra", pytrace=False)
        pytest.skip(f"{module} is not installed (pip install -e '.[bench]')")


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_smoke_run_writes_results_with_deliveries(tmp_path: Path) -> None:
    for module in ("picows", "uvloop", "matplotlib", "psutil", "numpy"):
        _need(module)
    env = {**os.environ}
    env.pop("WADDLE_BENCH_DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--quiet", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    waddle = results["systems"]["waddle"]
    assert len(results["runs"]) == 1 and results["runs"][0]["waddle"]
    for scenario in ("fanout", "throughput", "join-storm", "many-channels", "connect", "replay"):
        assert scenario in waddle, scenario
        assert "error" not in waddle[scenario], waddle[scenario]
    fanout = waddle["fanout"]["runs"]["20"]
    assert fanout["sent"] > 0
    assert fanout["deliveries"] > 0
    assert fanout["deliveries"] == fanout["sent"] * 20
    assert waddle["many-channels"]["deliveries"] > 0
    assert waddle["throughput"]["steps"][0]["deliveries"] > 0
    assert waddle["connect"]["connect"]["connected"] == 50
    assert waddle["connect"]["idle"]["connections"] == 50
    assert waddle["replay"]["replayed_counts"] == [100]
    storm = waddle["join-storm"]
    assert storm["storm"]["join"]["joined"] == storm["storm"]["join"]["count"] > 0
    assert storm["steady"]["deliveries"] > 0 and storm["storm"]["deliveries"] > 0
    (huge,) = waddle["huge-channel"]["runs"]
    assert huge["connect"]["connected"] == huge["members"] == 30
    assert len(huge["connections_per_worker"]) == 2, "over two edge processes"
    assert huge["sent"] > 0 and huge["lost"] == 0
    markdown = (tmp_path / "results.md").read_text()
    assert "### Fanout" in markdown and "Waddle" in markdown
    assert (tmp_path / "fanout.png").stat().st_size > 0


def test_bench_cli_rejects_unknown_names() -> None:
    _need("picows")
    from bench.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--systems", "nope"])
    args = build_parser().parse_args(["--systems", "waddle,floor", "--fanout-sizes", "10,20"])
    assert args.systems == ["waddle", "floor"] and args.fanout_sizes == [10, 20]
