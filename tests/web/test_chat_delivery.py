"""The delivery state of your own messages: sending, delivered, not sent (retry).

Playwright sits between the page and the edge on the page's WebSocket:
it holds back the server's answer to one message, so the page must show
it as sent and waiting, then as delivered once the answer comes; and it
refuses another message the way the server refuses one for good, so the
page must show it as not sent, with Retry (same clientMsgId: delivered
once) and Discard. "Queued" while disconnected is covered by
``test_chat_reconnect.py``. The same middle also drops the read cursor
from ``initial_state`` (as when the store is slow) to check that unread
counts still move. Needs Chromium (see ``tests/web/browser.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.async_api import WebSocketRoute, expect

from tests.support.stack import start_stack
from tests.web.browser import Client, Problems, chromium, open_page, sign_in, texts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HOLD = "hold this one"
REFUSE = ("refuse this one", "and this one")


class Middle:
    """Forwards the page's socket to the edge, holding or refusing chosen messages."""

    def __init__(self) -> None:
        self.route: WebSocketRoute | None = None
        self.held: list[str | bytes] = []
        self.holding: set[str] = set()  # clientMsgIds whose ack is held back
        self.refused: set[str] = set()
        self.sent: list[dict[str, object]] = []
        self.forget_cursors = False  # drop the read cursor from initial_state frames

    def handle(self, route: WebSocketRoute) -> None:
        self.route = route
        server = route.connect_to_server()

        def from_page(data: str | bytes) -> None:
            frame = json.loads(data)
            if frame.get("type") == "message":
                self.sent.append(frame)
                msg_id = frame["clientMsgId"]
                if frame["content"] == HOLD:
                    self.holding.add(msg_id)
                if frame["content"] in REFUSE and msg_id not in self.refused:
                    self.refused.add(msg_id)
                    route.send(
                        json.dumps(
                            {
                                "type": "error",
                                "channelId": frame["channelId"],
                                "code": "rejected",
                                "message": "Message could not be stored",
                                "clientMsgId": msg_id,
                            }
                        )
                    )
                    return
            server.send(data)

        def from_server(data: str | bytes) -> None:
            frame = json.loads(data)
            if frame.get("type") == "initial_state" and self.forget_cursors:
                # As when the store did not answer the edge in time.
                frame.pop("readSeq", None)
                frame.pop("unreadCount", None)
                route.send(json.dumps(frame))
                return
            held_message = frame.get("type") == "message" and frame["message"]["content"] == HOLD
            held_ack = frame.get("type") == "ack" and frame.get("clientMsgId") in self.holding
            if held_message or held_ack:
                self.held.append(data)
            else:
                route.send(data)

        route.on_message(from_page)
        server.on_message(from_server)

    def release(self) -> None:
        assert self.route is not None
        for data in self.held:
            self.route.send(data)
        self.held.clear()


async def test_delivery_states_and_retry(tmp_path: Path) -> None:
    problems = Problems()
    middle = Middle()
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        bob = await sign_in(browser, stack.edge_url, "bob", problems)
        context, page, sockets = await open_page(browser, stack.edge_url, "alice", problems)
        await page.route_web_socket(re.compile(r"/websocket$"), middle.handle)
        await page.locator("#name").fill("alice")
        await page.locator("#sign-in").click()
        alice = Client("alice", context, page, sockets)
        await alice.expect_connected()

        # Written, not yet stored: "Sending…"; the server's answer makes it delivered.
        await alice.send(HOLD)
        held = alice.message(HOLD)
        await expect(held).to_have_attribute("data-state", "sent")
        await expect(held.locator(".delivery")).to_have_text("Sending…")
        await expect(bob.message(HOLD)).to_have_count(1)  # stored and sent to others
        await expect(held).to_have_attribute("data-state", "sent")
        middle.release()
        await expect(held).to_have_attribute("data-state", "acked")
        await expect(held.locator(".delivery")).to_have_text("Delivered")

        # Refused for good: "Not sent", with the reason, Retry and Discard.
        await alice.send(REFUSE[0])
        refused = alice.message(REFUSE[0])
        await expect(refused).to_have_attribute("data-state", "failed")
        await expect(refused.locator(".delivery")).to_contain_text(
            "Not sent: Message could not be stored"
        )
        await refused.get_by_role("button", name="Retry").click()
        await expect(refused).to_have_attribute("data-state", "acked")
        await expect(bob.message(REFUSE[0])).to_have_count(1)

        await alice.send(REFUSE[1])
        discarded = alice.message(REFUSE[1])
        await expect(discarded).to_have_attribute("data-state", "failed")
        await discarded.get_by_role("button", name="Discard").click()
        await expect(discarded).to_have_count(0)

        # The retry reused the message's clientMsgId; every message shows once.
        retried = [f["clientMsgId"] for f in middle.sent if f["content"] == REFUSE[0]]
        assert len(retried) == 2 and retried[0] == retried[1]
        assert await texts(alice.messages.locator(".content")) == [HOLD, REFUSE[0]]
        assert await texts(bob.messages.locator(".content")) == [HOLD, REFUSE[0]]
    assert problems.found == []


# The page's saved session (sessionStorage) with #random joined after #general.
ADD_RANDOM = """() => {
  const saved = JSON.parse(sessionStorage.getItem('waddle.session'));
  saved.channels.push('random');
  sessionStorage.setItem('waddle.session', JSON.stringify(saved));
}"""


async def test_unread_counts_when_the_server_does_not_know_the_cursor(tmp_path: Path) -> None:
    """``initial_state`` may come without ``readSeq``/``unreadCount`` (the store
    was slow): the page counts what arrives unseen, and marks the channel read
    when it is shown, after which the server's count takes over."""
    problems = Problems()
    middle = Middle()
    middle.forget_cursors = True
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        bob = await sign_in(browser, stack.edge_url, "bob", problems, channel="random")
        await bob.send("before alice came")
        context, page, sockets = await open_page(browser, stack.edge_url, "alice", problems)
        await page.route_web_socket(re.compile(r"/websocket$"), middle.handle)
        await page.locator("#name").fill("alice")
        await page.locator("#sign-in").click()
        alice = Client("alice", context, page, sockets)
        await alice.expect_connected()
        # #random joined but never shown (as a reload restores it): nothing
        # has told the server where Alice's cursor is there.
        await page.evaluate(ADD_RANDOM)
        await page.reload()
        await alice.expect_connected()
        await expect(alice.channel("random")).to_have_attribute("data-state", "live")
        await expect(page.locator("#channel-title")).to_have_text("#general")

        badge = alice.channel("random").locator(".badge")
        await bob.send("one")
        await expect(badge).to_have_text("1")
        await bob.send("two")
        await expect(badge).to_have_text("2")
        await alice.open_channel("random")
        await expect(badge).to_be_hidden()
        assert await texts(alice.messages.locator(".content")) == [
            "before alice came",
            "one",
            "two",
        ]

        # Reading moved the cursor: from now on the library's count is used.
        await alice.open_channel("general")
        await bob.send("three")
        await expect(badge).to_have_text("1")
    assert problems.found == []
