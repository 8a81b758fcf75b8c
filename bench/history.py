"""History page latency on PostgreSQL: ``python -m bench.history --database-url URL``.

Creates a throwaway schema, migrates it (``store_service.migrate``), fills
ONE channel with ``--messages`` messages in a single ``generate_series``
insert (one in ``--reply-every`` a reply; the threads' roots spread evenly
over the channel, the replies skewed towards the oldest roots so one thread
is large enough to page deep), VACUUMs and ANALYZEs, then times history
pages through the store's real code: ``HistoryReader.page`` (the query path
the servicer calls) and the ``History`` RPC over gRPC with ``StoreClient``
(a real store server in this process on 127.0.0.1:0).

Pages (limit 50): the newest, one deep in the middle (``before_seq`` = half
the channel), the oldest, the newest page of the largest thread and that
thread's page before the middle. Each page is called ``--calls`` times after
a warm-up, per run; ``--runs`` runs. The table gives, per page and path,
the median over the runs of each run's median and p99, with the runs' min
and max. Then EXPLAIN (ANALYZE, BUFFERS) of each page's statement (the
page, each row's reply count and the head, in one) shows the indexes it
walks.

The schema is dropped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench.stats import percentile
from store_service.db import create_engine
from store_service.history import HistoryReader, history_query
from store_service.migrate import upgrade_async
from store_service.repository import MAX_SEQ, MessagePage, Repository
from store_service.server import start
from waddle_common.settings import Settings
from waddle_common.store_client import StoreClient
from waddle_pb import store_pb2

CHANNEL = "bench-history"
LIMIT = 50
USERS = 100
INDEXES = ("uq_messages_channel_id_seq", "ix_messages_channel_id_thread_id_seq")

# One INSERT ... SELECT for the whole channel. Message s (seq s) has id
# md5('m' || s); thread k's root is message 1 + k * stride. Message s is a
# reply when s is a multiple of reply_every (and not a root): of one of the
# threads rooted before it, picked as floor(open_threads * r^3) with r a
# multiplicative hash of s in [0, 1), so thread 0 gets about a tenth of all
# replies and the rest taper off.
_FILL = text(
    "INSERT INTO messages (id, channel_id, seq, user_id, username, content, thread_id,"
    " client_msg_id, created_at_ms)"
    " SELECT md5('m' || s), :channel, s, 'u' || (s % :users), 'user ' || (s % :users),"
    " 'message ' || s || ' ' || repeat('x', 100),"
    " CASE WHEN s % :every = 0 AND (s - 1) % :stride <> 0 THEN md5('m' || (1 + :stride * floor("
    "   (LEAST(:threads - 1, (s - 2) / :stride) + 1)"
    "   * power(((s * 2654435761) % 4294967296) / 4294967296.0, 3))::bigint)) END,"
    " md5('m' || s), :t0 + s * 1000"
    " FROM generate_series(1, CAST(:n AS bigint)) AS s"
)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    before_seq: int
    thread_id: str
    check: Callable[[MessagePage], str | None]  # what is wrong with the page, or None


@dataclass(frozen=True, slots=True)
class Summary:
    median_ms: list[float]  # one per run
    p99_ms: list[float]


def root_id(seq: int) -> str:
    """The id the fill gives message ``seq`` (and so a thread rooted at it)."""
    return hashlib.md5(f"m{seq}".encode()).hexdigest()


def schema_url(url: str, schema: str) -> str:
    parsed = make_url(url)
    query = dict(parsed.query)
    query["options"] = f"-csearch_path={schema}"
    return parsed.set(query=query).render_as_string(hide_password=False)


async def autocommit(url: str, *statements: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in statements:
                await conn.exec_driver_sql(statement)
    finally:
        await engine.dispose()


async def fill(url: str, messages: int, threads: int, every: int) -> dict[str, Any]:
    """Fill the channel; return what was made (counts, sizes, seconds)."""
    stride = max(1, messages // threads)
    engine = create_engine(url, pool_size=1)
    started = time.perf_counter()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (id, username, avatar_url) SELECT 'u' || i, 'user ' || i,"
                    " 'https://example.invalid/' || i || '.png'"
                    " FROM generate_series(0, :users - 1) AS i"
                ),
                {"users": USERS},
            )
            await conn.execute(
                text("INSERT INTO channels (id, last_seq) VALUES (:channel, :n)"),
                {"channel": CHANNEL, "n": messages},
            )
            await conn.execute(
                _FILL,
                {
                    "channel": CHANNEL,
                    "users": USERS,
                    "every": every,
                    "stride": stride,
                    "threads": threads,
                    "t0": 1_700_000_000_000,
                    "n": messages,
                },
            )
        filled = time.perf_counter() - started
        await autocommit(url, "VACUUM (ANALYZE) messages", "VACUUM (ANALYZE) users, channels")
        async with engine.connect() as conn:
            replies = await conn.scalar(
                text("SELECT count(*) FROM messages WHERE thread_id IS NOT NULL")
            )
            hot = await conn.scalar(
                text("SELECT count(*) FROM messages WHERE channel_id = :c AND thread_id = :t"),
                {"c": CHANNEL, "t": root_id(1)},
            )
            visible = await conn.scalar(
                text(
                    "SELECT round(100.0 * relallvisible / greatest(relpages, 1))"
                    " FROM pg_class WHERE oid = CAST('messages' AS regclass)"
                )
            )
            sizes = {
                name: await conn.scalar(
                    text("SELECT pg_size_pretty(pg_relation_size(CAST(:n AS regclass)))"),
                    {"n": name},
                )
                for name in ("messages", "pk_messages", *INDEXES)
            }
    finally:
        await engine.dispose()
    return {
        "fill_s": filled,
        "total_s": time.perf_counter() - started,
        "replies": int(replies or 0),
        "hot_thread_replies": int(hot or 0),
        "all_visible_pct": int(visible or 0),
        "sizes": sizes,
    }


def cases(messages: int) -> list[Case]:
    middle = messages // 2
    hot = root_id(1)

    def newest(p: MessagePage) -> str | None:
        ok = [m.seq for m in p.messages] == list(range(messages - LIMIT + 1, messages + 1))
        return None if ok and p.has_more else "not the newest 50"

    def deep(p: MessagePage) -> str | None:
        ok = [m.seq for m in p.messages] == list(range(middle - LIMIT, middle))
        return None if ok and p.has_more else "not the 50 before the middle"

    def oldest(p: MessagePage) -> str | None:
        ok = [m.seq for m in p.messages] == list(range(1, LIMIT + 1))
        if not ok or p.has_more:
            return "not the oldest 50"
        return None if p.messages[0].reply_count > 0 else "the first root has no reply count"

    def thread(before: int) -> Callable[[MessagePage], str | None]:
        def check(p: MessagePage) -> str | None:
            if not p.messages or any(m.thread_id != hot for m in p.messages):
                return "not the thread's replies"
            if before and p.messages[-1].seq >= before:
                return "not before the middle"
            return None

        return check

    return [
        Case("newest page", 0, "", newest),
        Case("middle page (before_seq = n/2)", middle, "", deep),
        Case("oldest page", LIMIT + 1, "", oldest),
        Case("thread page (largest thread)", 0, hot, thread(0)),
        Case("thread page before n/2", middle, hot, thread(middle)),
    ]


async def time_calls(call: Callable[[], Awaitable[object]], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return times


async def measure(
    url: str, messages: int, runs: int, calls: int, warmup: int
) -> dict[tuple[str, str], Summary]:
    """Time every case through the repository and over gRPC; ``runs`` times each."""
    engine = create_engine(url, pool_size=2)
    reader = HistoryReader(Repository(engine))
    settings = Settings(
        database_url=url, store_host="127.0.0.1", store_port=0, store_metrics_port=0
    )
    store = await start(settings)
    client = StoreClient(f"127.0.0.1:{store.grpc_port}", timeout=10.0)
    out: dict[tuple[str, str], Summary] = {}
    try:
        for case in cases(messages):
            problem = case.check(
                await reader.page(
                    CHANNEL, before_seq=case.before_seq, limit=LIMIT, thread_id=case.thread_id
                )
            )
            if problem:
                raise SystemExit(f"{case.name}: {problem}")
        for _ in range(runs):
            for case in cases(messages):

                def direct(case: Case = case) -> Awaitable[MessagePage]:
                    return reader.page(
                        CHANNEL, before_seq=case.before_seq, limit=LIMIT, thread_id=case.thread_id
                    )

                def rpc(case: Case = case) -> Awaitable[store_pb2.MessagePage]:
                    return client.history(
                        CHANNEL, before_seq=case.before_seq, limit=LIMIT, thread_id=case.thread_id
                    )

                for path, call in (("repository", direct), ("gRPC", rpc)):
                    times = await time_calls(call, calls, warmup)
                    summary = out.setdefault((case.name, path), Summary([], []))
                    summary.median_ms.append(statistics.median(times))
                    summary.p99_ms.append(percentile(times, 99))
    finally:
        await client.close()
        await store.stop(2.0)
        await engine.dispose()
    return out


async def explain(url: str, messages: int) -> list[tuple[str, str]]:
    """EXPLAIN (ANALYZE, BUFFERS) of each case's statement, with bound parameters."""
    engine = create_engine(url, pool_size=1)
    plans = []
    try:
        for case in cases(messages):
            upper = MAX_SEQ if case.before_seq == 0 else case.before_seq - 1
            statement = history_query(CHANNEL, upper, LIMIT + 1, case.thread_id or None)
            compiled = statement.compile(dialect=engine.dialect)
            async with engine.connect() as conn:
                rows = await conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), compiled.params
                )
                plans.append((case.name, "\n".join(str(row[0]) for row in rows)))
    finally:
        await engine.dispose()
    return plans


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


async def run(args: argparse.Namespace) -> int:
    base = make_url(args.database_url)
    if base.get_backend_name() != "postgresql":
        raise SystemExit("--database-url must be a PostgreSQL URL")
    base_url = base.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    schema = f"waddle_bench_history_{uuid.uuid4().hex[:12]}"
    url = schema_url(base_url, schema)
    print(f"# History pages: {args.messages:,} messages in one channel, limit {LIMIT}")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load at start {load()}")
    await autocommit(base_url, f'CREATE SCHEMA "{schema}"')
    print(f"schema {schema} (dropped at the end)")
    try:
        await upgrade_async(url)
        made = await fill(url, args.messages, args.threads, args.reply_every)
        print(
            f"filled in {made['fill_s']:.1f} s (+ VACUUM ANALYZE: {made['total_s']:.1f} s),"
            f" {made['replies']:,} replies, largest thread {made['hot_thread_replies']:,}"
        )
        print("sizes: " + ", ".join(f"{k} {v}" for k, v in made["sizes"].items()))
        # Below 100 when another session's snapshot held VACUUM back: the
        # reply counts then read the heap too ("Heap Fetches" below).
        print(f"messages pages all-visible after VACUUM: {made['all_visible_pct']}%")
        print(f"load before timing {load()}")
        results = await measure(url, args.messages, args.runs, args.calls, args.warmup)
        print(f"load after timing {load()}\n")
        print(
            f"| Page | Path | median ms, median of {args.runs} runs (min-max)"
            f" | p99 ms, median of {args.runs} runs (min-max) |"
        )
        print("|---|---|---|---|")
        for (name, path), summary in results.items():
            print(f"| {name} | {path} | {spread(summary.median_ms)} | {spread(summary.p99_ms)} |")
        print(f"\n{args.calls} calls per page and path per run, after {args.warmup} warm-up calls.")
        if not args.no_explain:
            for title, plan in await explain(url, args.messages):
                print(f"\n## EXPLAIN (ANALYZE, BUFFERS): {title}\n{plan}")
    finally:
        await autocommit(base_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("WADDLE_BENCH_DATABASE_URL", ""),
        help="PostgreSQL server to create the throwaway schema in"
        " (default: $WADDLE_BENCH_DATABASE_URL)",
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=1000)
    parser.add_argument("--reply-every", type=int, default=20, help="one reply in this many")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per page per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no-explain", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.database_url:
        build_parser().error("--database-url (or WADDLE_BENCH_DATABASE_URL) is required")
    if args.messages < 2 * LIMIT + 2 or args.threads < 1 or args.reply_every < 2:
        build_parser().error(
            f"need --messages >= {2 * LIMIT + 2}, --threads >= 1, --reply-every >= 2"
        )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
