"""checkov, the infrastructure-as-code scanner, passes the rendered chart and the Dockerfile.

The chart is rendered with each example value set and each further value
combination into one directory, the Dockerfile is copied beside them, and
one checkov run (it is slow to start) scans everything: any failed check
fails the test. A check the chart declines is skipped where it applies,
with a ``checkov.io/skipN: <ID>=<reason>`` annotation (the Dockerfile: a
``# checkov:skip=<ID>:<reason>`` comment), and every skip must give its
reason.

checkov pins libraries the test runner cannot share, so ``make test``
installs it into a virtual environment of its own (``.venv/scan``, from the
``scan`` dependency group); ``WADDLE_CHECKOV`` may name another executable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.chart import COMBINATIONS, ROOT, VALUE_FILES, load_values, render_raw

TIMEOUT = 300.0
FRAMEWORKS = ("kubernetes", "dockerfile")
# Where checkov's own comment goes when a skip gives none.
NO_REASON = "No comment provided"


def checkov_executable() -> str | None:
    configured = os.environ.get("WADDLE_CHECKOV", "").strip()
    if configured:
        return configured
    local = ROOT / ".venv" / "scan" / "bin" / "checkov"
    if local.is_file():
        return str(local)
    return shutil.which("checkov")


def value_sets() -> dict[str, Mapping[str, Any]]:
    sets: dict[str, Mapping[str, Any]] = {name: load_values(name) for name in VALUE_FILES}
    sets.update(COMBINATIONS)
    return sets


def write_renders(into: Path) -> list[str]:
    """One folder per value set, one file per template; returns the folder names."""
    for name, values in value_sets().items():
        folder = into / name
        folder.mkdir()
        for template, text in render_raw(values).items():
            if template.endswith(".yaml") and text.strip():
                (folder / template.replace("/", "__")).write_text(text)
    shutil.copy(ROOT / "Dockerfile", into / "Dockerfile")
    return list(value_sets())


def reports(raw: str) -> dict[str, dict[str, Any]]:
    parsed = json.loads(raw)
    listed = parsed if isinstance(parsed, list) else [parsed]
    return {report["check_type"]: report for report in listed}


def describe(check: dict[str, Any]) -> str:
    return f"{check['check_id']} {check['check_name']}: {check['file_path']} {check['resource']}"


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    checkov = checkov_executable()
    if checkov is None:
        reason = "checkov is not installed (`make test` installs it into .venv/scan)"
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail(f"{reason}; CI=true: the scan must run", pytrace=False)
        pytest.skip(reason)
    target = tmp_path_factory.mktemp("checkov")
    write_renders(target)
    cmd = [
        checkov,
        "--directory",
        str(target),
        "--framework",
        *FRAMEWORKS,
        "--output",
        "json",
        "--compact",
        # Offline: no guideline or policy download.
        "--skip-download",
    ]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=target
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"checkov took longer than {TIMEOUT:.0f} s")
    # 0: nothing failed, 1: something failed (reported below); anything else is an error.
    assert done.returncode in (0, 1), f"checkov exited {done.returncode}:\n{done.stderr[-3000:]}"
    return reports(done.stdout)


@pytest.mark.timeout(TIMEOUT + 60)
def test_rendered_chart_and_dockerfile_pass_checkov(scanned: dict[str, dict[str, Any]]) -> None:
    assert set(scanned) == set(FRAMEWORKS), f"checkov scanned {sorted(scanned)}"
    failed: list[str] = []
    for framework, report in scanned.items():
        summary = report["summary"]
        assert summary["parsing_errors"] == 0, f"{framework}: files checkov could not parse"
        assert summary["passed"] > 0, f"{framework}: nothing was checked"
        failed += [describe(c) for c in report["results"]["failed_checks"]]
    assert failed == [], "checkov findings:\n" + "\n".join(failed)


@pytest.mark.timeout(TIMEOUT + 60)
def test_every_value_set_was_scanned(scanned: dict[str, dict[str, Any]]) -> None:
    results = scanned["kubernetes"]["results"]
    checked = {
        Path(c["file_path"]).parts[1] for c in results["passed_checks"] + results["skipped_checks"]
    }
    assert checked == set(value_sets())


@pytest.mark.timeout(TIMEOUT + 60)
def test_every_skipped_check_gives_its_reason(scanned: dict[str, dict[str, Any]]) -> None:
    skipped = [c for report in scanned.values() for c in report["results"]["skipped_checks"]]
    assert skipped, "no skip was seen: the annotations did not reach checkov"
    unexplained = [
        describe(c)
        for c in skipped
        if len(c["check_result"].get("suppress_comment", "").strip()) < 20
        or c["check_result"]["suppress_comment"] == NO_REASON
    ]
    assert unexplained == [], "skipped without a reason:\n" + "\n".join(unexplained)
    # The Dockerfile's one decline is there and explained too.
    assert any(
        c["check_id"] == "CKV_DOCKER_7" for c in scanned["dockerfile"]["results"]["skipped_checks"]
    )
