"""Where the edge learns which channel shards exist: the membership source.

* Static: ``WADDLE_CHANNEL_SHARDS``, fixed for the process's life.
* DNS: ``WADDLE_CHANNEL_SHARDS_DNS``, re-resolved every
  ``WADDLE_CHANNEL_SHARDS_DNS_SECONDS``:

  - ``host:port`` (the part after the last colon is a port): every A and
    AAAA address of ``host``, each with that port;
  - anything else is an SRV name (in Kubernetes, the channel StatefulSet's
    headless Service, ``_grpc._tcp.<service>.<namespace>.svc.cluster.local``):
    every record's ``target:port``. The targets are the pods' stable names,
    so a restarted pod keeps its channels (rendezvous hashing keys on the
    address; a pod IP would change with every restart).

A resolution that fails or comes back empty changes nothing: the last list
stands (a DNS hiccup must not empty the ring). Each new answer goes to
``on_change`` only when it differs from the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

log = logging.getLogger("edge.membership")


class MembershipError(Exception):
    """The membership source could not be read."""


@dataclass(frozen=True, slots=True)
class DnsName:
    name: str
    port: int | None  # None: an SRV name

    @classmethod
    def parse(cls, value: str) -> DnsName:
        value = value.strip().rstrip(".")
        host, sep, port = value.rpartition(":")
        if sep and port.isdigit():
            number = int(port)
            if not host or not 0 < number < 65536:
                raise ValueError(f"WADDLE_CHANNEL_SHARDS_DNS={value!r}: expected host:port")
            return cls(host.strip("[]"), number)
        if not value or ":" in value:
            raise ValueError(
                f"WADDLE_CHANNEL_SHARDS_DNS={value!r}: expected an SRV name or host:port"
            )
        return cls(value, None)


def parse_nameserver(value: str) -> tuple[str, int] | None:
    """``ip`` or ``ip:port`` (``[v6]:port``) -> (ip, port); empty -> None."""
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, "53"
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"WADDLE_DNS_SERVER={value!r}: expected ip or ip:port")
    return host, int(port)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DnsMembership:
    """Resolves the shard list from DNS, once or every ``interval`` seconds."""

    def __init__(
        self,
        name: str,
        *,
        interval: float,
        nameserver: str = "",
        timeout: float = 2.0,
    ) -> None:
        self.target = DnsName.parse(name)
        self.interval = interval
        self.timeout = timeout
        self.resolver = dns.asyncresolver.Resolver(configure=not nameserver)
        server = parse_nameserver(nameserver)
        if server is not None:
            self.resolver.nameservers = [server[0]]
            self.resolver.port = server[1]
        self.last: tuple[str, ...] = ()

    async def resolve(self) -> tuple[str, ...]:
        """The current shard addresses, sorted; raise ``MembershipError``."""
        try:
            if self.target.port is None:
                answer = await self.resolver.resolve(
                    self.target.name, "SRV", lifetime=self.timeout, search=False
                )
                found = {
                    _address(r.target.to_text(omit_final_dot=True), int(r.port)) for r in answer
                }
            else:
                found = set()
                for rdtype in ("A", "AAAA"):
                    with contextlib.suppress(dns.resolver.NoAnswer):
                        answer = await self.resolver.resolve(
                            self.target.name, rdtype, lifetime=self.timeout, search=False
                        )
                        found |= {_address(r.address, self.target.port) for r in answer}
        except (dns.exception.DNSException, OSError) as exc:
            raise MembershipError(f"{self.target.name}: {exc}") from exc
        if not found:
            raise MembershipError(f"{self.target.name}: no records")
        return tuple(sorted(found))

    async def refresh(self, on_change: Callable[[Sequence[str]], None]) -> bool:
        """Resolve once; hand a changed answer to ``on_change``. Return whether
        the name answered."""
        try:
            shards = await self.resolve()
        except MembershipError as exc:
            log.warning(
                "shard membership not resolved; keeping the last list", extra={"error": str(exc)}
            )
            return False
        if shards != self.last:
            self.last = shards
            on_change(shards)
        return True

    async def run(self, on_change: Callable[[Sequence[str]], None]) -> None:
        """Re-resolve forever (the first resolution is the caller's ``refresh``)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh(on_change)
