"""Threads: a reply appears in the other user's thread panel and in the root's count.

Bob replies to Alice's message from the thread panel; Alice's root shows
the count, her panel lists the reply, and her own reply reaches Bob's open
panel live. Replies stay out of the channel's timeline. The keyboard opens
and closes the panel, and the focus comes back to the message. Needs
Chromium (see ``tests/web/browser.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.support.stack import start_stack
from tests.web.browser import Problems, chromium, sign_in, texts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_thread_reply_reaches_the_other_panel(tmp_path: Path) -> None:
    problems = Problems()
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        alice = await sign_in(browser, stack.edge_url, "alice", problems)
        bob = await sign_in(browser, stack.edge_url, "bob", problems)
        await alice.send("Release on Friday?")
        await alice.send("The changelog is ready.")
        root_on_bob = bob.message("Release on Friday?")
        await expect(root_on_bob).to_have_count(1)

        # Bob opens the thread from the message and replies there.
        await root_on_bob.hover()
        await root_on_bob.get_by_role("button", name="Reply to alice in a thread").click()
        panel = bob.page.locator("#thread-panel")
        await expect(panel).to_be_visible()
        await expect(panel.locator(".thread-root .content")).to_have_text("Release on Friday?")
        await expect(bob.page.locator("#thread-composer")).to_be_focused()
        await bob.page.locator("#thread-composer").fill("Yes, after the demo")
        await bob.page.locator("#thread-composer").press("Enter")
        await expect(panel.locator(".msg.mine .content")).to_have_text("Yes, after the demo")
        await expect(panel.locator(".msg.mine")).to_have_attribute("data-state", "acked")

        # Alice: the root counts it; the reply is not in the channel's timeline.
        root_on_alice = alice.message("Release on Friday?")
        replies = root_on_alice.locator(".replies")
        await expect(replies).to_have_text("1 reply")
        assert await texts(alice.messages.locator(".content")) == [
            "Release on Friday?",
            "The changelog is ready.",
        ]

        # Alice opens the thread with the keyboard: the reply is listed.
        await root_on_alice.focus()
        await root_on_alice.press("Enter")
        alice_panel = alice.page.locator("#thread-panel")
        await expect(alice_panel.locator(".thread-root .content")).to_have_text(
            "Release on Friday?"
        )
        reply = alice_panel.locator(".msg").filter(has_text="Yes, after the demo")
        await expect(reply.locator(".author")).to_have_text("bob")
        await expect(alice_panel.locator(".replies-heading")).to_have_text("1 reply")

        # Her reply reaches Bob's open panel live; both roots count two.
        await alice.page.locator("#thread-composer").fill("Great, I'll tag it")
        await alice.page.locator("#thread-composer").press("Enter")
        live = panel.locator(".msg").filter(has_text="Great, I'll tag it")
        await expect(live.locator(".author")).to_have_text("alice")
        assert await texts(
            panel.locator("#thread-scroller > .messages:not(.thread-root) .content")
        ) == [
            "Yes, after the demo",
            "Great, I'll tag it",
        ]
        await expect(replies).to_have_text("2 replies")
        await expect(root_on_bob.locator(".replies")).to_have_text("2 replies")

        # Escape closes the panel and gives the focus back to the message.
        await alice.page.keyboard.press("Escape")
        await expect(alice_panel).to_be_hidden()
        await expect(root_on_alice).to_be_focused()
    assert problems.found == []
