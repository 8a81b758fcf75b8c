"""Run the JavaScript client tests (``node --test``) as part of pytest.

The tests in ``tests/js/*.test.mjs`` need Node 20+ and the npm devDependency
``ws`` (``npm ci`` at the repository root). Their output is printed so that a
failure shows which Node test broke.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.timeout(300)


def test_node_client_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (20 or newer) is required to run tests/js: install Node.js")
    if not (ROOT / "node_modules" / "ws").is_dir():
        pytest.fail("node_modules/ws is missing: run `npm ci` in the repository root")
    files = sorted(str(p.relative_to(ROOT)) for p in JS_TESTS.glob("*.test.mjs"))
    assert files, "no tests/js/*.test.mjs files found"
    # Files are listed explicitly: `node --test DIR` is read as a glob by newer Node.
    result = subprocess.run(
        [node, "--test", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
        check=False,
    )
    print(result.stdout)
    print(result.stderr)
    assert result.returncode == 0, f"node --test failed (exit code {result.returncode})"
