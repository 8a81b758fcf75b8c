"""The page keeps its user across development-token renewals.

``POST /dev/token`` with a name makes a new user every time, so the page
renews the token it holds (``Authorization: Bearer``) once half its life
has passed. The page's clock is fast-forwarded (Playwright's fake clock);
the renewal must ask with the current token and get the same user back,
and the chat must carry on. Needs Chromium (see ``tests/web/browser.py``).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from playwright.async_api import Request, expect

from tests.support.stack import start_stack
from tests.web.browser import Client, Problems, chromium, open_page

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_page_renews_its_token_for_the_same_user(tmp_path: Path) -> None:
    channel = f"renew-{uuid.uuid4().hex[:10]}"
    problems = Problems()
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        context, page, sockets = await open_page(browser, stack.edge_url, "alice", problems)
        await page.clock.install()
        await page.reload()

        def is_dev_token(request: Request) -> bool:
            return request.url.endswith("/dev/token") and request.method == "POST"

        await page.fill("#name", "alice")
        await page.fill("#channel", channel)
        async with page.expect_response(lambda r: is_dev_token(r.request)) as first_info:
            await page.click("#sign-in")
        first = await (await first_info.value).json()
        alice = Client("alice", context, page, sockets)
        await alice.expect_connected()

        # Half of the token's hour later, the page renews it.
        async with page.expect_response(lambda r: is_dev_token(r.request)) as renew_info:
            await page.clock.fast_forward("31:00")
        renewal = await renew_info.value
        assert renewal.status == 200
        sent = await renewal.request.all_headers()
        assert sent.get("authorization") == f"Bearer {first['token']}"
        renewed = await renewal.json()
        assert (renewed["userId"], renewed["username"]) == (first["userId"], "alice")
        assert renewed["expiresAt"] >= first["expiresAt"]

        # Still the same user in the chat: a sent message is "mine".
        await alice.send("after renewal")
        mine = alice.message("after renewal")
        await expect(mine).to_have_class(re.compile(r"\bmine\b"))
        await expect(mine).to_have_attribute("data-state", "acked")
        await expect(alice.member("alice")).to_have_count(1)
        assert len(sockets) == 1
    assert problems.found == []
