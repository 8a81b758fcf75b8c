"""The shard membership from DNS: the name's forms, and resolution against a
real DNS server on 127.0.0.1 whose SRV records the test changes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from edge.membership import DnsMembership, DnsName, MembershipError, parse_nameserver
from tests.support.dns import SrvServer

NAME = "_grpc._tcp.waddle-channel.waddle.svc.cluster.local"


def test_names_and_nameservers_parse() -> None:
    assert DnsName.parse(NAME) == DnsName(NAME, None)
    assert DnsName.parse(NAME + ".") == DnsName(NAME, None)
    assert DnsName.parse("waddle-channel.waddle:50051") == DnsName("waddle-channel.waddle", 50051)
    for bad in ("", "host:0", "host:70000", ":50051", "a:b:c"):
        with pytest.raises(ValueError, match="WADDLE_CHANNEL_SHARDS_DNS"):
            DnsName.parse(bad)
    assert parse_nameserver("") is None
    assert parse_nameserver("10.0.0.10") == ("10.0.0.10", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    with pytest.raises(ValueError, match="WADDLE_DNS_SERVER"):
        parse_nameserver("127.0.0.1:port")


async def test_srv_records_are_followed_and_a_bad_answer_keeps_the_last_list() -> None:
    seen: list[Sequence[str]] = []
    with SrvServer(NAME) as dns:
        members = DnsMembership(NAME, interval=1, nameserver=dns.address, timeout=2)
        dns.set(["127.0.0.1:5001", "127.0.0.1:5002"])
        assert await members.refresh(seen.append)
        assert seen == [("127.0.0.1:5001", "127.0.0.1:5002")]
        assert await members.refresh(seen.append)
        assert len(seen) == 1, "an unchanged answer is not news"
        dns.set(["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"])
        assert await members.refresh(seen.append)
        assert seen[-1] == ("127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003")
        dns.set([])  # an empty answer (every pod not ready, a DNS hiccup)
        assert not await members.refresh(seen.append)
        assert len(seen) == 2 and members.last == seen[-1]
        asked = dns.queries
    # The server is gone: resolution fails, the last list stands.
    assert not await members.refresh(seen.append)
    assert len(seen) == 2
    assert asked >= 4


async def test_an_unknown_name_is_an_error() -> None:
    with SrvServer(NAME) as dns:
        members = DnsMembership("_grpc._tcp.other.test", interval=1, nameserver=dns.address)
        with pytest.raises(MembershipError, match=r"other\.test"):
            await members.resolve()
