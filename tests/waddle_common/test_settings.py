"""Settings come from WADDLE_ variables, lists are comma separated, bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from waddle_common.settings import Settings


def test_defaults_work_on_a_laptop(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("WADDLE_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.edge_port == 8080
    assert s.shard_list == ("127.0.0.1:50051",)
    assert s.database_url.startswith("sqlite+aiosqlite:///")
    assert s.channel_max_connections == 10000
    assert s.dev_mode is False


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WADDLE_CHANNEL_SHARDS", "a:1, b:2 ,c:3")
    monkeypatch.setenv("WADDLE_CHANNEL_MAX_CONNECTIONS", "5")
    monkeypatch.setenv("WADDLE_DEV_MODE", "1")
    s = Settings()
    assert s.shard_list == ("a:1", "b:2", "c:3")
    assert s.channel_max_connections == 5
    assert s.dev_mode is True


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("WADDLE_CHANNEL_SHARDS", ""),
        ("WADDLE_CHANNEL_SHARDS", "a:1,a:1"),
        ("WADDLE_EDGE_PORT", "70000"),
        ("WADDLE_CHANNEL_MAX_CONNECTIONS", "0"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_credentials_are_read_from_files_in_the_secrets_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WADDLE_JWT_SECRET", raising=False)
    monkeypatch.delenv("WADDLE_DATABASE_URL", raising=False)
    # What a Kubernetes Secret volume holds: one file per key, often newline-terminated.
    (tmp_path / "WADDLE_JWT_SECRET").write_text("from-a-file-" + "k" * 32 + "\n")
    (tmp_path / "WADDLE_DATABASE_URL").write_text("postgresql+psycopg://u:p@db:5432/w")
    monkeypatch.setenv("WADDLE_SECRETS_DIR", str(tmp_path))
    s = Settings()
    assert s.jwt_secret == "from-a-file-" + "k" * 32
    assert s.database_url == "postgresql+psycopg://u:p@db:5432/w"
    assert s.secrets_dir == str(tmp_path)


def test_a_variable_that_is_set_wins_over_its_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "WADDLE_JWT_SECRET").write_text("file-value")
    monkeypatch.setenv("WADDLE_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("WADDLE_JWT_SECRET", "env-value")
    assert Settings().jwt_secret == "env-value"


def test_without_a_secrets_dir_files_are_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "WADDLE_JWT_SECRET").write_text("file-value")
    monkeypatch.delenv("WADDLE_SECRETS_DIR", raising=False)
    monkeypatch.delenv("WADDLE_JWT_SECRET", raising=False)
    assert Settings().jwt_secret == ""


def test_a_missing_secrets_dir_is_an_error_that_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("WADDLE_SECRETS_DIR", str(missing))
    with pytest.raises(ValueError, match=f"WADDLE_SECRETS_DIR={missing}"):
        Settings()
