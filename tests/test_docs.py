"""The README documents exactly the settings that exist, and the protocol
document every error code and close code the server uses."""

from __future__ import annotations

import re
from pathlib import Path

from waddle_common import wire
from waddle_common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_configuration_table_matches_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(WADDLE_[A-Z0-9_]+)` \|", readme, re.MULTILINE))
    actual = {f"WADDLE_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual, (
        f"undocumented: {sorted(actual - documented)}; stale: {sorted(documented - actual)}"
    )


def test_protocol_doc_lists_every_error_and_close_code() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for kind in wire.ERRORS:
        assert f"`{kind.code}`" in doc, kind.code
        assert kind.message in doc, kind.message
    for code in (
        wire.CLOSE_NORMAL,
        wire.CLOSE_POLICY,
        wire.CLOSE_TOO_BIG,
        wire.CLOSE_INTERNAL,
        wire.CLOSE_RESTART,
        wire.CLOSE_TRY_AGAIN,
        wire.CLOSE_TOKEN_EXPIRED,
    ):
        assert f"| {code} |" in doc, code
