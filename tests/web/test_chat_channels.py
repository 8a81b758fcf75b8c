"""Two people chat in two channels through one socket each; unread counts follow live.

Also: every message is attributed to its author and your own are marked,
and a channel can be left from the sidebar. Needs Chromium (see
``tests/web/browser.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.support.stack import start_stack
from tests.web.browser import Problems, chromium, sign_in, texts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MINE = re.compile(r"\bmine\b")


async def test_two_channels_unread_counts_and_one_socket(tmp_path: Path) -> None:
    problems = Problems()
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        alice = await sign_in(browser, stack.edge_url, "alice", problems)
        bob = await sign_in(browser, stack.edge_url, "bob", problems)
        await alice.join("random")
        await bob.join("random")
        await alice.open_channel("general")

        # Bob writes in #random while Alice reads #general: her #random count rises live.
        badge = alice.channel("random").locator(".badge")
        await expect(badge).to_be_hidden()
        await bob.send("anyone for lunch?")
        await expect(badge).to_have_text("1")
        await bob.send("12:30 at the usual place")
        await expect(badge).to_have_text("2")
        await expect(alice.page).to_have_title(re.compile(r"^\(2\) #general"))

        # Bob writes in #general, where Alice is: no count there, the message shows.
        await bob.open_channel("general")
        await bob.send("morning all")
        await expect(alice.message("morning all").locator(".author")).to_have_text("bob")
        await expect(alice.channel("general").locator(".badge")).to_be_hidden()

        # Alice opens #random: both messages, in order, under Bob's name; the count clears.
        await alice.open_channel("random")
        shown = await texts(alice.messages.locator(".content"))
        assert shown == ["anyone for lunch?", "12:30 at the usual place"]
        assert await texts(alice.messages.locator(".author")) == ["bob", "bob"]
        await expect(badge).to_be_hidden()
        await expect(alice.page).to_have_title(re.compile(r"^#random"))

        # Her answer is hers on her page, Bob's count of #random rises on his.
        await alice.send("count me in")
        await expect(alice.message("count me in")).to_have_class(MINE)
        await expect(alice.message("count me in")).to_have_attribute("data-state", "acked")
        await expect(bob.channel("random").locator(".badge")).to_have_text("1")
        await bob.open_channel("random")
        reply = bob.message("count me in")
        await expect(reply.locator(".author")).to_have_text("alice")
        await expect(reply).not_to_have_class(MINE)
        await expect(bob.channel("random").locator(".badge")).to_be_hidden()

        # The keyboard switches channels too (Alt+Arrow), still on one socket.
        await alice.page.locator("#composer").press("Alt+ArrowUp")
        await expect(alice.page.locator("#channel-title")).to_have_text("#general")
        await expect(alice.page.locator("#composer")).to_be_focused()

        # Leaving #random: gone from the sidebar; Bob's messages there no longer count.
        await alice.channel("random").locator(".leave-button").click()
        await expect(alice.channel("random")).to_have_count(0)
        await bob.send("still there?")
        await bob.open_channel("general")
        await bob.send("see you")
        await expect(alice.message("see you")).to_have_count(1)
        await expect(alice.page.locator("#channel-list .badge:visible")).to_have_count(0)

        for client in (alice, bob):
            assert [s.url.rsplit("/", 1)[-1] for s in client.sockets] == ["websocket"], (
                f"{client.name} opened {len(client.sockets)} sockets"
            )
    assert problems.found == []
