"""Suite-wide hooks: tests that check counts report them in the terminal summary."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{report.nodeid}: {value}"
        for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
        for key, value in report.user_properties
        if key == "checked" and report.when == "call"
    ]
    if lines:
        terminalreporter.section("counts checked")
        for line in lines:
            terminalreporter.write_line(line)
