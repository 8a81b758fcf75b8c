"""A real DNS server on 127.0.0.1 for tests (dnslib), serving SRV records the
test changes while it runs.

``SrvServer(name)`` answers ``SRV`` queries for ``name`` with one record per
address set by ``set(["127.0.0.1:5001", ...])`` (target ``127.0.0.1.``, the
address's port), TTL 0; any other name or type gets NXDOMAIN. Use it as a
context manager; ``.address`` is ``"127.0.0.1:<udp port>"``, what
``WADDLE_DNS_SERVER`` takes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

from dnslib import QTYPE, RCODE, RR, SRV, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, name: str) -> None:
        self.name = name.rstrip(".").lower()
        self.records: list[tuple[str, int]] = []
        self.queries = 0
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            self.queries += 1
            records = list(self.records)
        if qname != self.name or request.q.qtype != QTYPE.SRV:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for host, port in records:
            reply.add_answer(
                RR(request.q.qname, QTYPE.SRV, ttl=0, rdata=SRV(0, 10, port, host + "."))
            )
        return reply


class SrvServer:
    def __init__(self, name: str) -> None:
        self.resolver = _Resolver(name)
        self.server = DNSServer(self.resolver, address="127.0.0.1", port=0, logger=_Quiet())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server.server_address[1]}"

    @property
    def queries(self) -> int:
        with self.resolver.lock:
            return self.resolver.queries

    def set(self, addresses: Sequence[str]) -> None:
        records = []
        for address in addresses:
            host, _, port = address.rpartition(":")
            records.append((host, int(port)))
        with self.resolver.lock:
            self.resolver.records = records

    def __enter__(self) -> SrvServer:
        self._thread = threading.Thread(target=self.server.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.server.shutdown()
        self.server.server.server_close()
        self._thread.join(timeout=5)


class _Quiet:
    """dnslib's logger interface, logging nothing."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None
