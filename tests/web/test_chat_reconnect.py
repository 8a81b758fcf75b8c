"""The edge is killed under two open pages; a third user chats on meanwhile.

Alice and Bob are on edge 0, Carol on edge 1. Edge 0 is killed: both pages
say they are reconnecting (with a working "Retry now") and their member
lists stop claiming who is online. Alice's network goes too: her page says
she is offline, and her message waits as queued. Carol writes twice and
changes her status. Edge 0 comes back, Bob reconnects, then Alice's
network returns: both pages show Carol's messages exactly once, in order
and under her name (not folded under Bob, who wrote last before the kill),
Alice's queued message is delivered as hers, and the member list is as it
is now, Alice's own status included. Needs Chromium (see ``tests/web/browser.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.support.stack import start_stack
from tests.web.browser import SOCKET_FAILED, Problems, chromium, sign_in, texts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CONTINUED = re.compile(r"\bcontinued\b")
UNKNOWN = "\N{EN DASH}"  # the online count while not connected
# The page asks the endpoint why a handshake failed; with the edge (or the
# network) down that fails too.
PROBE_FAILED = re.compile(
    r"^Failed to load resource: net::ERR_(CONNECTION_REFUSED|INTERNET_DISCONNECTED)$"
)
# Clicks "Retry now" if it is shown, in one step in the page (no race with a reconnect).
RETRY_IF_SHOWN = (
    "() => { const b = document.getElementById('retry-now'); if (!b.hidden) b.click(); }"
)


async def test_pages_resume_after_the_edge_is_killed(tmp_path: Path) -> None:
    problems = Problems()
    problems.allow(SOCKET_FAILED, PROBE_FAILED)
    async with (
        start_stack(tmp_path, dev_mode=True, edges=2) as stack,
        chromium() as (_pw, browser),
    ):
        alice = await sign_in(browser, stack.edge_url, "alice", problems)
        bob = await sign_in(browser, stack.edge_url, "bob", problems)
        carol = await sign_in(browser, stack.http_url("", edge=1), "carol", problems)
        await alice.page.locator("#presence").select_option("away")
        await expect(carol.member("alice")).to_have_class("member status-away")
        await alice.send("hello")
        await bob.send("before restart")
        for client in (alice, carol):
            await expect(client.message("before restart")).to_have_count(1)

        await stack.edges[0].kill()

        for client in (alice, bob):
            page = client.page
            await expect(page.locator("#conn-state")).to_have_class(
                re.compile(r"\bstate-reconnecting\b")
            )
            await expect(page.locator("#banner")).to_contain_text("Reconnecting")
            await expect(page.locator("#retry-now")).to_be_visible()
            # The member list no longer pretends to know who is online.
            await expect(page.locator("#members-note")).to_be_visible()
            await expect(page.locator("#members .member.status-online")).to_have_count(0)
            await expect(page.locator("#members .member.status-unknown")).to_have_count(3)
            await expect(page.locator("#members-count")).to_have_text(UNKNOWN)

        # Screen readers hear of it once (the banner's countdown is not read out).
        announcer = bob.page.locator("#conn-announcer")
        await expect(announcer).to_have_text("Connection lost. Reconnecting.")
        await expect(announcer).to_have_attribute("role", "status")

        # "Retry now" tries again (and fails: the edge is still down).
        async with bob.page.expect_websocket():
            await bob.page.locator("#retry-now").click()
        await expect(bob.page.locator("#banner")).to_contain_text("Reconnecting")

        # Alice's network goes away too: the page says she is offline, and
        # what she writes waits, marked as queued.
        await alice.context.set_offline(True)
        await alice.page.evaluate(RETRY_IF_SHOWN)  # an attempt now finds no network
        await expect(alice.page.locator("#banner")).to_contain_text("You are offline")
        await expect(alice.page.locator("#conn-state")).to_have_class(
            re.compile(r"\bstate-offline\b")
        )
        await alice.send("sent while offline")
        queued = alice.message("sent while offline")
        await expect(queued).to_have_attribute("data-state", "queued")
        await expect(queued.locator(".delivery")).to_contain_text("Queued")

        # Carol chats on through the other edge.
        await carol.send("carol 1")
        await carol.send("carol 2")
        await carol.page.locator("#presence").select_option("dnd")
        await expect(carol.message("carol 2")).to_have_attribute("data-state", "acked")

        # Edge 0 is back. Bob reconnects first, then Alice's network returns:
        # the restarted edge numbers its connections anew, so Alice's new
        # connection gets the number Bob's had before the kill. Her message
        # must still be hers.
        await stack.restart_edge(0)
        await bob.page.evaluate(RETRY_IF_SHOWN)
        await bob.expect_connected()
        await expect(announcer).to_have_text("Connected again.")
        await alice.context.set_offline(False)
        for client in (alice, bob):
            await client.expect_connected()
            await expect(client.page.locator("#banner")).to_be_hidden()

        # Stored as Alice's (the server must not take her for Bob), once.
        await expect(bob.message("sent while offline").locator(".author")).to_have_text("alice")
        await expect(queued).to_have_attribute("data-state", "acked")
        expected = ["hello", "before restart", "carol 1", "carol 2", "sent while offline"]
        for client in (alice, bob, carol):
            content = client.messages.locator(".content")
            await expect(content).to_have_count(len(expected))
            assert await texts(content) == expected, client.name
            authors = await texts(client.messages.locator(".author"))
            assert authors == ["alice", "bob", "carol", "carol", "alice"], client.name
            # Carol's first message heads a group of its own: not folded under Bob's.
            await expect(client.message("carol 1")).not_to_have_class(CONTINUED)
            await expect(client.message("carol 2")).to_have_class(CONTINUED)

            # The member list is right again: who is here, and their status.
            await expect(client.page.locator("#members-note")).to_be_hidden()
            await expect(client.page.locator("#members .member")).to_have_count(3)
            await expect(client.member("carol")).to_have_class("member status-dnd")
            await expect(client.member("alice")).to_have_class("member status-away")
            await expect(client.member("bob")).to_have_class("member status-online")
        # Alice's own status: the picker and her entry agree.
        await expect(alice.page.locator("#presence")).to_have_value("away")
        await expect(alice.member("alice").locator(".member-status")).to_have_text("Away")
    assert problems.found == []
