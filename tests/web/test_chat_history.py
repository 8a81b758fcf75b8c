"""Scrolling up pages back through a channel's history, with day separators.

A channel is seeded with more messages than the first screen holds (and a
thread among them) by a WebSocket client; the page shows the newest, then
each scroll to the top loads the page before, until the channel's first
message, each message once and in order. Thread replies stay in the thread
(the root shows their count). The day separators and the author grouping
are checked on messages of two days. Needs Chromium (see
``tests/web/browser.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import expect

from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack
from tests.web.browser import Problems, chromium, sign_in, texts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ROOTS = 130  # channel messages besides the thread's replies
THREAD_AT = 10  # the 10th message is a thread root...
REPLIES = 3  # ...with this many replies, sent right after it

# Messages sent faster than a person types.
FAST = {
    "WADDLE_MESSAGE_RATE": "2000",
    "WADDLE_MESSAGE_BURST": "2000",
    "WADDLE_FRAME_RATE": "2000",
    "WADDLE_FRAME_BURST": "2000",
}


async def seed(stack: Stack, channel: str) -> list[str]:
    """Send the channel's messages as ann and ben, in blocks; return the roots' texts in order."""
    roots: list[str] = []
    async with aiohttp.ClientSession() as http:
        ann = await WsClient.connect(
            http, stack.ws_url(channel), token=stack.token("seed-ann", "ann")
        )
        ben = await WsClient.connect(
            http, stack.ws_url(channel), token=stack.token("seed-ben", "ben")
        )
        try:
            for client in (ann, ben):
                await client.recv_type("initial_state")

            async def say(client: WsClient, content: str, **extra: Any) -> dict[str, Any]:
                await client.send({"type": "message", "content": content, **extra})
                return await client.recv_type("ack")

            for i in range(1, ROOTS + 1):
                author = ann if (i // 7) % 2 == 0 else ben
                text = f"message {i}"
                ack = await say(author, text, clientMsgId=f"m{i}")
                roots.append(text)
                if i == THREAD_AT:
                    for r in range(1, REPLIES + 1):
                        await say(ben, f"reply {r}", clientMsgId=f"r{r}", threadId=ack["id"])
        finally:
            await ann.close()
            await ben.close()
    return roots


# Renders messages of two days into a Timeline, out of order (a history page
# arriving after live messages), and reports what each row shows.
DAYS_AND_GROUPS = """
async () => {
  const { Timeline } = await import('/static/app/timeline.js');
  const t = new Timeline({ label: 'test', isMine: (id) => id === 'me', threads: false });
  const day = 24 * 3600 * 1000;
  const morning = new Date();
  morning.setHours(10, 0, 0, 0);
  const today = morning.getTime();
  const m = (seq, userId, ts) => ({
    id: `m${seq}`, seq, userId, username: userId, content: `c${seq}`, timestamp: ts,
    channelId: 'x', threadId: null,
  });
  t.insert([m(4, 'bob', today), m(5, 'carol', today + 60000), m(6, 'carol', today + 120000)]);
  t.insert([m(1, 'bob', today - day), m(2, 'bob', today - day + 60000), m(3, 'me', today - day + 3600000)]);
  return Array.from(t.list.querySelectorAll('.msg'), (n) => [
    Number(n.dataset.seq),
    n.classList.contains('day-start') ? n.querySelector('.day-label').textContent : '',
    n.classList.contains('continued'),
    n.querySelector('.author').textContent,
    n.classList.contains('mine'),
  ]);
}
"""


async def test_scrolling_up_loads_older_messages(tmp_path: Path) -> None:
    problems = Problems()
    channel = "general"
    async with (
        start_stack(tmp_path, dev_mode=True, env=FAST) as stack,
        chromium() as (_pw, browser),
    ):
        roots = await seed(stack, channel)
        alice = await sign_in(browser, stack.edge_url, "alice", problems, channel=channel)
        page = alice.page
        scroller = page.locator("#scroller")
        head = page.locator("#scroller .history-status")
        content = alice.messages.locator(".content")

        # The newest message is in view; older ones are a click or a scroll away.
        await expect(alice.message(roots[-1])).to_be_in_viewport()
        await expect(head).to_have_attribute("data-state", "more")
        await expect(head.get_by_role("button", name="Load earlier messages")).to_have_count(1)
        first_screen = await content.count()
        assert 0 < first_screen < ROOTS

        pages = 0
        while await head.get_attribute("data-state") != "start":
            assert pages < 6, "history does not reach the first message"
            shown = await content.count()
            top = await alice.messages.first.get_attribute("data-seq")
            await scroller.evaluate("el => { el.scrollTop = 0; }")
            await page.wait_for_function(
                """([n]) => document.querySelectorAll('#scroller .msg .content').length > n
                || document.querySelector('#scroller .history-status').dataset.state === 'start'""",
                arg=[shown],
            )
            pages += 1
            # The message that was on top stays in view: the list does not jump.
            await expect(page.locator(f'#scroller .msg[data-seq="{top}"]')).to_be_in_viewport()
        assert pages >= 2

        # Every message once, in order; replies only as the root's count.
        assert await texts(content) == roots
        await expect(head).to_have_text(f"This is the beginning of #{channel}.")
        root = alice.message(f"message {THREAD_AT}")
        await expect(root.locator(".replies")).to_have_text(f"{REPLIES} replies")
        authors = await texts(alice.messages.locator(".author"))
        assert authors[:7] == ["ann"] * 6 + ["ben"]
        # All sent today: one day separator, on the first message.
        await expect(page.locator("#scroller .msg.day-start")).to_have_count(1)
        await expect(alice.messages.first).to_have_class("msg day-start")

        # Day separators and grouping, over two days and out-of-order inserts.
        rows = await page.evaluate(DAYS_AND_GROUPS)
        assert rows == [
            [1, "Yesterday", False, "bob", False],
            [2, "", True, "bob", False],
            [3, "", False, "me", True],
            [4, "Today", False, "bob", False],
            [5, "", False, "carol", False],
            [6, "", True, "carol", False],
        ]
    assert problems.found == []
