"""Typing indicators and presence between three people (three browser contexts).

Who is typing shows and clears, for one person and for several at once;
status changes (away, do not disturb) show in everyone's member list, your
own included; someone who leaves drops off the list. Needs Chromium (see
``tests/web/browser.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.support.stack import start_stack
from tests.web.browser import Problems, chromium, sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_typing_and_presence_between_three_people(tmp_path: Path) -> None:
    problems = Problems()
    env = {"WADDLE_PRESENCE_LINGER_SECONDS": "0"}
    async with (
        start_stack(tmp_path, dev_mode=True, env=env) as stack,
        chromium() as (_pw, browser),
    ):
        alice = await sign_in(browser, stack.edge_url, "alice", problems)
        bob = await sign_in(browser, stack.edge_url, "bob", problems)
        carol = await sign_in(browser, stack.edge_url, "carol", problems)
        for client in (alice, bob, carol):
            await expect(client.page.locator("#members .member")).to_have_count(3)
            await expect(client.page.locator("#members-count")).to_have_text("3")
        typing = bob.page.locator("#typing")

        # One typist, then two at once. (Whoever must still be typing at a
        # check types again first: a pause of a few seconds ends "typing".)
        alice_box = alice.page.locator("#composer")
        carol_box = carol.page.locator("#composer")
        await alice_box.press_sequentially("he")
        await expect(typing).to_have_text("alice is typing…")
        await carol_box.press_sequentially("one sec")
        await alice_box.press_sequentially("l")
        await expect(typing).to_have_text("alice and carol are typing…")
        await expect(alice.page.locator("#typing")).to_have_text("carol is typing…")

        # Sending ends Alice's; emptying the box ends Carol's.
        await alice_box.press_sequentially("lo")
        await carol_box.press_sequentially(".")
        await alice_box.press("Enter")
        await expect(bob.message("hello")).to_have_count(1)
        await expect(typing).to_have_text("carol is typing…")
        await carol_box.fill("")
        await expect(typing).to_have_text("")

        # Status changes show in every member list, and in your own.
        await carol.page.locator("#presence").select_option("dnd")
        await expect(bob.member("carol")).to_have_class("member status-dnd")
        await expect(bob.member("carol").locator(".member-status")).to_have_text("Do not disturb")
        await alice.page.locator("#presence").select_option("away")
        for client in (alice, bob, carol):
            await expect(client.member("alice")).to_have_class("member status-away")
            await expect(client.member("alice").locator(".member-status")).to_have_text("Away")
        await expect(alice.member("alice").locator(".you-tag")).to_have_count(1)
        await alice.page.locator("#presence").select_option("online")
        await expect(carol.member("alice")).to_have_class("member status-online")

        # Carol closes her page: she leaves everyone's list.
        await carol.context.close()
        await expect(bob.member("carol")).to_have_count(0)
        await expect(alice.page.locator("#members-count")).to_have_text("2")
    assert problems.found == []
