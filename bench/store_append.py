"""Store CPU per appended message: the store process alone, driven like a channel shard.

``python -m bench.store_append`` migrates a fresh database (a schema in the
PostgreSQL server named by ``--database-url`` or ``WADDLE_BENCH_DATABASE_URL``,
or a SQLite file with ``--sqlite``), starts the real store with ``python -m
store_service`` on a free port, and for each rate appends to one channel for
``--seconds``: a sender queues 200-byte messages at the rate and one commit
loop sends everything queued as one request on an ``AppendStream`` whenever
the previous one has answered, numbering after the head it last saw, as the
shard's hub does (``--unary``: one unary ``AppendBatch`` call each instead,
as before the stream). The store's CPU (user + system, from /proc) over the
window, divided by the messages acknowledged, is one run; each rate gets
``--runs`` runs and prints the median and min-max in microseconds.

``--profile FILE`` records the store with py-spy (raw collapsed stacks) during
the first run of the first rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
import psutil

from bench.systems import create_schema, drop_schema
from waddle_common.grpc_util import channel_options
from waddle_common.supervise import Service, run_to_completion, start_service
from waddle_pb import store_pb2, store_pb2_grpc

if TYPE_CHECKING:
    from waddle_pb.store_pb2_grpc import StoreServiceAsyncStub

CONTENT = "x" * 200
WARMUP_SECONDS = 2.0
SPY_FLAGS = os.environ.get("BENCH_SPY_FLAGS", "--nonblocking").split()


@dataclass(frozen=True)
class Run:
    rate: float
    messages: int
    commits: int
    cpu_seconds: float

    @property
    def us_per_message(self) -> float:
        return 1e6 * self.cpu_seconds / max(1, self.messages)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class Shard:
    """One channel's sender and group-commit loop, as the shard's hub runs them."""

    def __init__(self, stub: StoreServiceAsyncStub, channel_id: str, *, unary: bool) -> None:
        self.stub = stub
        self.unary = unary
        self.channel_id = channel_id
        self.head = 0
        self.pending: list[store_pb2.NewMessage] = []
        self.wakeup = asyncio.Event()
        self.acked = 0
        self.commits = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def publish(self) -> None:
        self.pending.append(
            store_pb2.NewMessage(
                id=str(uuid.uuid4()),
                user_id="bench-user",
                username="Bench User",
                content=CONTENT,
                timestamp_ms=time.time_ns() // 1_000_000,
                client_msg_id=str(uuid.uuid4()),
            )
        )
        self.idle.clear()
        self.wakeup.set()

    async def commit_loop(self) -> None:
        stream = None if self.unary else self.stub.AppendStream()
        try:
            await self._commits(stream)
        finally:
            if stream is not None:
                stream.cancel()

    async def _commits(self, stream: Any) -> None:
        while True:
            if not self.pending:
                self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch, self.pending = self.pending, []
            request = store_pb2.AppendBatchRequest(
                channels=[
                    store_pb2.ChannelAppend(
                        channel_id=self.channel_id, expected_last_seq=self.head, messages=batch
                    )
                ]
            )
            if stream is None:
                response = await self.stub.AppendBatch(request)
            else:
                await stream.write(request)
                answer = await stream.read()
                if answer is grpc.aio.EOF or answer.code:
                    raise RuntimeError(f"append stream failed: {answer}")
                response = answer.batch
            [result] = response.channels
            if result.status != store_pb2.ChannelAppendResult.OK:
                raise RuntimeError(f"append fenced at {result.last_seq}, expected {self.head}")
            self.head = result.last_seq
            self.acked += len(batch)
            self.commits += 1

    async def drive(self, rate: float, seconds: float) -> None:
        """Publish at ``rate`` for ``seconds`` (catching up after a late wake-up)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while (now := loop.time()) - start < seconds:
            due = int((now - start) * rate) + 1
            for _ in range(due - sent):
                self.publish()
            sent = due
            await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))

    async def drained(self) -> None:
        await self.idle.wait()


async def measure(
    stub: StoreServiceAsyncStub, pid: int, rate: float, seconds: float, *, unary: bool = False
) -> Run:
    shard = Shard(stub, f"bench-{uuid.uuid4().hex[:8]}", unary=unary)
    loop_task = asyncio.create_task(shard.commit_loop())
    try:
        await shard.drive(rate, min(WARMUP_SECONDS, seconds))
        await shard.drained()
        proc = psutil.Process(pid)
        acked, commits, cpu = shard.acked, shard.commits, _cpu(proc)
        await shard.drive(rate, seconds)
        await shard.drained()
        return Run(rate, shard.acked - acked, shard.commits - commits, _cpu(proc) - cpu)
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task


@contextlib.asynccontextmanager
async def store_process(tmp: Path, database_url: str | None) -> AsyncIterator[Service]:
    schema = ""
    if database_url:
        schema, url = create_schema(database_url)
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'waddle.db'}"
    env = {"WADDLE_DATABASE_URL": url, "WADDLE_LOG_LEVEL": "info"}
    try:
        await run_to_completion("store_service.migrate", env)
        store = await start_service(
            "store",
            "store_service",
            {**env, "WADDLE_STORE_PORT": "0", "WADDLE_STORE_METRICS_PORT": "0"},
            log_path=tmp / "store.log",
        )
        try:
            yield store
        finally:
            await store.stop(timeout=10)
    finally:
        if schema and database_url:
            drop_schema(database_url, schema)


@contextlib.asynccontextmanager
async def profiling(pid: int, out: Path | None) -> AsyncIterator[None]:
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
        "--output", str(out), *SPY_FLAGS,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        await asyncio.wait_for(proc.wait(), 30)


def summary(runs: Sequence[Run]) -> str:
    values = [r.us_per_message for r in runs]
    commits = sum(r.commits for r in runs)
    messages = sum(r.messages for r in runs)
    return (
        f"{runs[0].rate:6.0f} msg/s: store CPU {statistics.median(values):7.1f} us/msg"
        f" (min {min(values):.1f}, max {max(values):.1f}, {len(runs)} runs;"
        f" {messages / max(1, commits):.2f} msg/commit)"
    )


async def run(args: argparse.Namespace) -> int:
    database_url = None if args.sqlite else args.database_url
    if not args.sqlite and not database_url:
        print("no PostgreSQL URL: pass --database-url, set WADDLE_BENCH_DATABASE_URL, or --sqlite")
        return 2
    with tempfile.TemporaryDirectory(prefix="waddle-store-append-") as tmp:
        async with store_process(Path(tmp), database_url) as store:
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{store.port('grpc_port')}", options=channel_options()
            )
            stub = cast("StoreServiceAsyncStub", store_pb2_grpc.StoreServiceStub(channel))
            try:
                for i, rate in enumerate(args.rates):
                    runs = []
                    for j in range(args.runs):
                        out = args.profile if i == 0 and j == 0 else None
                        async with profiling(store.pid, out):
                            runs.append(
                                await measure(stub, store.pid, rate, args.seconds, unary=args.unary)
                            )
                        print(f"  run {j + 1}: {runs[-1].us_per_message:.1f} us/msg", flush=True)
                    print(summary(runs), flush=True)
            finally:
                await channel.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_append", description=__doc__)
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 300.0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (plus warm-up)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--database-url", default=os.environ.get("WADDLE_BENCH_DATABASE_URL", "") or None
    )
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead")
    parser.add_argument(
        "--unary", action="store_true", help="one unary AppendBatch per commit, not a stream"
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw output file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0 or any(r <= 0 for r in args.rates):
        parser.error("--runs, --seconds and --rates must be positive")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
