"""The installed package (what the container image runs) carries every
file the edge serves: the page's modules live in subfolders of
``edge/static``, which a flat ``static/*`` pattern would leave out."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_every_static_file(tmp_path: Path) -> None:
    # A clean copy: an editable install's *.egg-info would list files itself.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "node_modules", "*.egg-info", "build", "var", "__pycache__", ".*cache"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
    )  # fmt: skip
    [wheel] = tmp_path.glob("waddle*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "edge" / "static"
    served = {
        f"edge/static/{p.relative_to(static).as_posix()}" for p in static.rglob("*") if p.is_file()
    }
    assert any("/" in name.removeprefix("edge/static/") for name in served), "subfolders exist"
    assert served <= packaged, sorted(served - packaged)
