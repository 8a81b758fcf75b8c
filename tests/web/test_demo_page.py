"""Two browsers chat through the page served by the edge, on the real stack.

The page must be served with the strict Content-Security-Policy it is
written for; any console error or warning (a CSP violation among them) or
uncaught exception fails the test (see ``tests/web/browser.py``). Text from
other users is shown as text, never interpreted as markup.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.support.stack import start_stack
from tests.web.browser import Problems, chromium, sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MINE = re.compile(r"\bmine\b")


async def test_two_pages_chat_live_and_markup_stays_text(tmp_path: Path) -> None:
    channel = f"web-{uuid.uuid4().hex[:10]}"
    problems = Problems()
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        alice = await sign_in(browser, stack.edge_url, "alice", problems, channel=channel)
        bob = await sign_in(browser, stack.edge_url, "bob", problems, channel=channel)
        await expect(bob.member("alice")).to_have_count(1)

        # Alice sends markup: Bob shows it literally, as text, under her name.
        await alice.send("<b>x</b><img src=x>")
        received = bob.message("<b>x</b><img src=x>")
        await expect(received).to_have_count(1)
        await expect(received.locator(".author")).to_have_text("alice")
        assert await bob.page.locator("#scroller b, #scroller .content img").count() == 0
        assert "&lt;b&gt;x&lt;/b&gt;" in await received.locator(".content").inner_html()

        # The sender's copy is acknowledged and marked as hers.
        mine = alice.message("<b>x</b><img src=x>")
        await expect(mine).to_have_attribute("data-state", "acked")
        await expect(mine).to_have_class(MINE)
        await expect(received).not_to_have_class(MINE)

        # A reply in the other direction.
        await bob.send("hi alice")
        await expect(alice.message("hi alice").locator(".author")).to_have_text("bob")
    assert problems.found == []
