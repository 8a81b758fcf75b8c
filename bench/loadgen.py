"""The load-generator worker: ``python -m bench.loadgen SPEC.json``.

One worker process (uvloop + picows) opens the WebSockets its spec lists,
reports ``connected`` on stdout, then obeys commands read line by line from
stdin and answers each with one JSON event line:

* ``{"cmd": "run", "rate": R, "duration": D, "drain": T}``: the senders (only
  in the worker that has them) publish ``R`` messages per second for ``D``
  seconds, round-robin over their sockets (``"senders": [first, count]``:
  over those senders only); every recording receiver notes
  the index and arrival time (``time.time_ns()``) of each benchmark message.
  Once the send window is over the worker waits until every expected
  delivery arrived, or deliveries stop for a second, or ``T`` seconds pass,
  then writes the deliveries to an ``.npz`` file and answers ``result``.
  With ``"join": {"channel": C, "count": J, "within": W, "after": A}`` the
  worker also opens ``J`` new connections to ``C`` (fresh users, not
  recording) during the window, starting ``A`` seconds in and spread evenly
  over ``W`` seconds (a join storm); the result says how many made it.
* ``{"cmd": "replay", "messages": M, "rounds": R}`` (Waddle only): publish
  ``M`` messages and wait for their acks, connect a fresh client and time
  ``sync`` after those ``M`` messages until ``sync_complete``.
* ``{"cmd": "close"}``: close every socket and exit.

While it works it prints ``progress`` events twice a second. Latency is
arrival time minus the send time stamped into the content, both from this
machine's clock, so receivers may be split across workers.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.protocols import (
    ADAPTERS,
    IDX_DIGITS,
    IDX_OFFSET,
    MARK,
    NS_DIGITS,
    NS_OFFSET,
    Adapter,
    bench_content,
)

TEXT = WSMsgType.TEXT


@dataclass(slots=True)
class Recorder:
    """Every benchmark delivery seen by this worker's recording receivers."""

    idx: array.array[int] = field(default_factory=lambda: array.array("q"))
    arrival: array.array[int] = field(default_factory=lambda: array.array("q"))
    sent_ns: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.idx = array.array("q")
        self.arrival = array.array("q")
        self.sent_ns = {}

    def __len__(self) -> int:
        return len(self.idx)


class Client(WSListener):
    """One WebSocket of the load generator."""

    def __init__(
        self, adapter: Adapter, channel: str, recorder: Recorder | None, *, counter: list[int]
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.channel = channel
        self.recorder = recorder
        self.counter = counter  # [deliveries, acks] shared by the worker
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sync_done: asyncio.Future[int] | None = None
        self.replayed = 0
        self.msg_prefix = adapter.message_prefix

    # picows callbacks -------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not TEXT:
            return
        data = frame.get_payload_as_bytes()
        if data.startswith(self.msg_prefix):
            rec = self.recorder
            if rec is not None:
                now = time.time_ns()
                p = data.find(MARK)
                if p >= 0:
                    i = int(data[p + IDX_OFFSET : p + IDX_OFFSET + IDX_DIGITS])
                    rec.idx.append(i)
                    rec.arrival.append(now)
                    if i not in rec.sent_ns:
                        rec.sent_ns[i] = int(data[p + NS_OFFSET : p + NS_OFFSET + NS_DIGITS])
                    self.counter[0] += 1
            if self.sync_done is not None:
                self.replayed += 1
            return
        a = self.adapter
        if data.startswith(a.ack_prefix):
            self.counter[1] += 1
        elif data.startswith(a.ready_prefix):
            if not self.ready.done():
                self.ready.set_result(None)
        elif data.startswith(a.sync_complete_prefix):
            if self.sync_done is not None and not self.sync_done.done():
                self.sync_done.set_result(self.replayed)
        else:
            a.on_other(data, self, self.channel)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before ready"))
        if self.sync_done is not None and not self.sync_done.done():
            self.sync_done.set_exception(ConnectionError("closed during sync"))

    # helpers ------------------------------------------------------------------

    def send_text(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.send(TEXT, data)

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.disconnect()


def _factory(client: Client) -> Callable[[], Client]:
    return lambda: client


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.adapter = ADAPTERS[spec["proto"]]
        self.base: str = spec["base_url"]
        self.secret: str | None = spec.get("jwt_secret")
        self.worker_id: int = spec.get("worker_id", 0)
        self.recorder = Recorder()
        self.counter = [0, 0]
        self.clients: list[Client] = []
        self.senders: list[Client] = []
        self.connect_ms: list[float] = []
        self.failures = 0
        self.retries = 0
        self.first_error = ""
        self.next_index = 0
        self.sent = 0
        self.phase = "connect"
        self._user_seq = 0
        # "spread_source_ips": each worker connects from its own loopback
        # address (127.0.0.2, .3, ...): one address has only the ephemeral
        # port range (about 28k ports) for connections to one server port.
        self.local_addr: dict[str, Any] = (
            {"local_addr": (f"127.0.0.{2 + self.worker_id}", 0)}
            if spec.get("spread_source_ips")
            else {}
        )

    def _user(self) -> str:
        self._user_seq += 1
        return f"w{self.worker_id}-u{self._user_seq}"

    async def open(
        self, channel: str, records: bool, deadline: float, user: str | None = None
    ) -> Client | None:
        """Connect one client and wait for its ready frame; retry refusals until ``deadline``."""
        adapter = self.adapter
        url = adapter.url(self.base, channel)
        user = user or self._user()
        headers = adapter.headers(user, self.secret)
        rec = self.recorder if records else None
        started = time.perf_counter()
        delay = 0.05
        while True:
            # picows passes the upgrade request/response to a factory that
            # takes arguments: this one takes none.
            client = Client(adapter, channel, rec, counter=self.counter)
            try:
                await ws_connect(
                    _factory(client),
                    url,
                    extra_headers=headers,
                    websocket_handshake_timeout=30,
                    enable_auto_pong=True,
                    read_buffer_init_size=4096,
                    **self.local_addr,
                )
                await asyncio.wait_for(client.ready, max(1.0, deadline - time.monotonic()))
                self.connect_ms.append((time.perf_counter() - started) * 1000)
                return client
            except Exception as exc:  # refusals (503), timeouts, resets
                client.close()
                if not self.first_error:
                    self.first_error = f"{type(exc).__name__}: {exc}"[:300]
                if time.monotonic() + delay >= deadline:
                    self.failures += 1
                    return None
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def connect_all(self) -> None:
        spec = self.spec
        concurrency: int = spec.get("concurrency", 100)
        deadline = time.monotonic() + float(spec.get("connect_timeout", 120))
        # (channel, records, is_sender, user or None for a fresh one)
        jobs: list[tuple[str, bool, bool, str | None]] = []
        # Senders after every receiver (the default), or right after their own
        # group's receivers ("by_group": a channel's members join together).
        by_group = spec.get("order") == "by_group"
        for group in spec["groups"]:
            channel, users = group["channel"], int(group.get("users", 0))
            for j in range(group.get("receivers", 0)):
                # A pool of ``users`` identities, each with several connections.
                user = f"{channel}-w{self.worker_id}-u{j % users}" if users else None
                jobs.append((channel, True, False, user))
            if by_group and group.get("sender"):
                jobs.append((channel, bool(group.get("sender_records")), True, None))
        for group in spec["groups"]:
            if group.get("sender") and not by_group:
                jobs.append((group["channel"], bool(group.get("sender_records")), True, None))
        self.target = len(jobs)
        sem = asyncio.Semaphore(concurrency)

        async def one(channel: str, records: bool, is_sender: bool, user: str | None) -> None:
            async with sem:
                client = await self.open(channel, records, deadline, user)
            if client is not None:
                self.clients.append(client)
                if is_sender:
                    self.senders.append(client)

        started = time.perf_counter()
        await asyncio.gather(*(one(*job) for job in jobs))
        self.connect_elapsed = time.perf_counter() - started

    async def run(
        self,
        rate: float,
        duration: float,
        drain: float,
        expected: int,
        senders_slice: tuple[int, int] | None = None,
        join: dict[str, Any] | None = None,
    ) -> None:
        """One measured window; ``expected`` is deliveries per message in this worker."""
        storm = asyncio.create_task(self.join_storm(**join)) if join else None
        self.recorder.reset()
        self.counter[0] = 0
        self.phase = "run"
        first = self.next_index
        content_size: int = self.spec.get("content_size", 200)
        senders = self.senders
        if senders_slice is not None:
            start, count = senders_slice
            senders = senders[start : start + count]
        total = int(rate * duration) if senders else 0
        enc = self.adapter.encode_message
        loop_started = time.perf_counter()
        k = 0
        while k < total:
            elapsed = time.perf_counter() - loop_started
            due = min(total, int(elapsed * rate) + 1)
            while k < due:
                senders[k % len(senders)].send_text(enc(bench_content(first + k, content_size)))
                k += 1
            delay = loop_started + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        if not senders:
            await asyncio.sleep(duration)
        send_seconds = time.perf_counter() - loop_started
        joined = await storm if storm is not None else None
        self.next_index = first + k
        self.sent = k
        # Drain: wait for the stragglers, bounded.
        self.phase = "drain"
        want = k * expected if senders else -1
        end = time.monotonic() + drain
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < end:
            n = len(self.recorder)
            if want >= 0 and n >= want:
                break
            if n != last_count:
                last_count, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > 1.5 and (want < 0 or n > 0):
                break
            await asyncio.sleep(0.05)
        rec = self.recorder
        idx = np.frombuffer(rec.idx, dtype=np.int64).copy() if len(rec) else np.zeros(0, np.int64)
        arrival = (
            np.frombuffer(rec.arrival, dtype=np.int64).copy() if len(rec) else np.zeros(0, np.int64)
        )
        if len(rec):
            lo, hi = int(idx.min()), int(idx.max())
            sent_at = np.zeros(hi - lo + 1, dtype=np.int64)
            for i, ns in rec.sent_ns.items():
                sent_at[i - lo] = ns
            latency = arrival - sent_at[idx - lo]
        else:
            latency = np.zeros(0, np.int64)
        out = Path(self.spec["out_dir"]) / f"w{self.worker_id}-{first}.npz"
        np.savez(out, idx=idx - first, latency=latency)
        self.phase = "idle"
        emit(
            "result",
            file=str(out),
            first_index=first,
            sent=k,
            send_seconds=send_seconds,
            deliveries=len(rec),
            acks=self.counter[1],
            join=joined,
        )

    async def join_storm(
        self, channel: str, count: int, within: float, after: float = 0.0
    ) -> dict[str, Any]:
        """Open ``count`` connections to ``channel``, their starts spread over ``within`` s."""
        started = time.perf_counter() + after
        deadline = time.monotonic() + after + within + float(self.spec.get("connect_timeout", 60))
        times: list[float] = []
        before = self.failures

        async def one(i: int) -> None:
            delay = started + within * i / max(1, count) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            client = await self.open(channel, False, deadline)
            if client is not None:
                self.clients.append(client)
                times.append((time.perf_counter() - started) * 1000)
                self.connect_ms.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(one(i) for i in range(count)))
        return {
            "count": count,
            "joined": len(times),
            "failures": self.failures - before,
            "last_joined_ms": max(times) if times else None,
            "connect_ms": sorted(self.connect_ms[-len(times) :]) if times else [],
        }

    async def replay(self, messages: int, rounds: int) -> None:
        """Time ``sync`` over ``messages`` missed messages, ``rounds`` times."""
        self.phase = "replay"
        sender = self.senders[0]
        channel = sender.channel
        deadline_pad = 60.0
        times_ms: list[float] = []
        counts: list[int] = []
        for _ in range(rounds):
            acks_before = self.counter[1]
            enc = self.adapter.encode_message
            for j in range(messages):
                sender.send_text(enc(bench_content(self.next_index + j, 200)))
                if j % 200 == 199:
                    await asyncio.sleep(0)
            self.next_index += messages
            end = time.monotonic() + deadline_pad
            # Acks arrive in a picows callback; a short poll keeps that callback trivial.
            while self.counter[1] - acks_before < messages and time.monotonic() < end:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            client = await self.open(channel, False, time.monotonic() + 30)
            if client is None:
                continue
            # The channel is this worker's alone: its head is what it published.
            head = self.next_index
            client.sync_done = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            client.send_text(self.adapter.encode_sync(max(0, head - messages)))
            try:
                count = await asyncio.wait_for(client.sync_done, 30)
                times_ms.append((time.perf_counter() - started) * 1000)
                counts.append(count)
            except (TimeoutError, ConnectionError):
                pass
            client.close()
        self.phase = "idle"
        emit("replay", times_ms=times_ms, counts=counts, messages=messages)

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            emit(
                "progress",
                phase=self.phase,
                connected=len(self.clients),
                target=getattr(self, "target", 0),
                deliveries=self.counter[0],
                failures=self.failures,
            )

    async def main(self) -> None:
        ticker = asyncio.create_task(self.progress())
        await self.connect_all()
        summary = self.connect_ms
        emit(
            "connected",
            connected=len(self.clients),
            senders=len(self.senders),
            failures=self.failures,
            retries=self.retries,
            elapsed_s=self.connect_elapsed,
            connect_ms=summary,
            first_error=self.first_error,
        )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = orjson.loads(line)
            if cmd["cmd"] == "run":
                picked = cmd.get("senders")
                await self.run(
                    float(cmd["rate"]),
                    float(cmd["duration"]),
                    float(cmd.get("drain", 5)),
                    int(cmd.get("expected", 1)),
                    (int(picked[0]), int(picked[1])) if picked else None,
                    cmd.get("join"),
                )
            elif cmd["cmd"] == "replay":
                await self.replay(int(cmd["messages"]), int(cmd.get("rounds", 3)))
            elif cmd["cmd"] == "close":
                break
        ticker.cancel()
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.2)
        emit("closed")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = orjson.loads(Path(args[0]).read_bytes())
    _raise_fd_limit()
    runner: Callable[[Any], Any]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a bench dependency
        runner = asyncio.run
    runner(Worker(spec).main())
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
