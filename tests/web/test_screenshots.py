"""The README's screenshots can be made again: ``python -m tests.web.screenshots`` works.

Runs the script for two of its pictures into a temporary folder and checks
that they are PNG images of the promised sizes (the page reporting any
problem fails the script). Needs Chromium (see ``tests/web/browser.py``).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.web.browser import chromium_executable
from tests.web.screenshots import capture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG and head[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


async def test_screenshots_script(tmp_path: Path) -> None:
    chromium_executable()  # skip (or fail under CI=true) without Chromium
    written = await capture(tmp_path / "shots", shots=("desktop-light", "phone-dark"))
    assert [p.name for p in written] == ["desktop-light.png", "phone-dark.png"]
    assert png_size(written[0]) == (1280, 800)
    assert png_size(written[1]) == (750, 1480)  # 375x740 at twice the density
