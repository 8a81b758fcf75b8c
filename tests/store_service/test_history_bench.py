"""``python -m bench.history`` on a small channel: it fills, times, explains and cleans up."""

from __future__ import annotations

import re

import psycopg
import pytest
from sqlalchemy.engine import make_url

from bench import history as bench_history
from tests.support.postgres import base_url

pytestmark = pytest.mark.postgres


def schema_exists(url: str, schema: str) -> bool:
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
    return bool(row and row[0])


def test_a_small_run_reports_every_page_and_drops_its_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = base_url()
    args = ["--database-url", url, "--messages", "3000", "--threads", "10"]
    assert bench_history.main([*args, "--runs", "2", "--calls", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out

    match = re.search(r"schema (waddle_bench_history_\w+) \(dropped at the end\)", out)
    assert match, out
    assert not schema_exists(url, match.group(1))
    assert "filled in" in out
    assert "3,000 messages in one channel" in out
    assert "messages pages all-visible after VACUUM: 100%" in out
    rows = re.findall(r"^\| (.+?) \| (repository|gRPC) \| ([\d.]+) \(", out, re.MULTILINE)
    pages = {(page, path) for page, path, _ in rows}
    assert len(pages) == len(rows) == 10, out
    assert all(float(ms) > 0 for _, _, ms in rows)
    # One plan per page, each walking the index it should.
    plans = out.split("## EXPLAIN (ANALYZE, BUFFERS): ")[1:]
    assert len(plans) == 5
    for plan in plans[:3]:
        assert "Index Scan Backward using uq_messages_channel_id_seq on messages" in plan, plan
    for plan in plans[3:]:
        assert "Index Scan Backward using ix_messages_channel_id_thread_id_seq" in plan, plan
    for plan in plans:
        assert (
            "Index Only Scan using ix_messages_channel_id_thread_id_seq on messages reply" in plan
        )


def test_a_channel_too_small_for_the_pages_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        bench_history.main(["--database-url", "postgresql://x/y", "--messages", "10"])
    assert caught.value.code == 2
    assert "need --messages >= 102" in capsys.readouterr().err
