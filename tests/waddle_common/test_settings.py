"""Settings come from WADDLE_ variables, lists are comma separated, bad values are refused."""

from __future__ import annotations

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
