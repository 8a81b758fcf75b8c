"""The committed generated code is exactly what `make protos` produces."""

from __future__ import annotations

from pathlib import Path

from waddle_common.protogen import ROOT, generate


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert generated, "protoc produced nothing"
    drift = [
        str(rel)
        for rel in generated
        if not (ROOT / rel).exists() or (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    committed = {p.name for p in (ROOT / "waddle_pb").iterdir() if p.is_file()}
    extra = committed - {p.name for p in generated}
    assert not drift, f"run `make protos`: out of date: {drift}"
    assert not extra, f"stale generated files: {sorted(extra)}"
