"""A token refused on reconnect is explained, and the page gets going again.

The edge restarts with another JWT secret, so every token the pages hold is
refused. Alice signed in by name (development mode): her page fetches a
fresh token by itself, says that it signed her in again, and her status
(do not disturb) is the same in her picker and her member-list entry.
Bob signed in with a pasted token: his page says the token was refused and
asks for another; with the new one he is back. Neither page is left saying
"Reconnecting" for ever. Needs Chromium (see ``tests/web/browser.py``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import jwt
import pytest
from playwright.async_api import expect

from tests.support.stack import start_stack
from tests.web.browser import SOCKET_FAILED, Problems, chromium, sign_in
from waddle_common.supervise import start_service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NEW_SECRET = "another-secret-" + "y" * 24
MINE = re.compile(r"\bmine\b")
# Refused handshakes, the page's probe of why, and a refused token renewal.
REFUSED = re.compile(
    r"^Failed to load resource: (net::ERR_CONNECTION_REFUSED|the server responded with a status of 401)"
)


async def test_refused_tokens_are_explained_and_replaced(tmp_path: Path) -> None:
    problems = Problems()
    problems.allow(SOCKET_FAILED, REFUSED)
    # The old Alice (a user id the new key no longer signs) leaves the lists soon.
    env = {"WADDLE_REJOIN_GRACE_SECONDS": "1", "WADDLE_PRESENCE_LINGER_SECONDS": "0"}
    async with (
        start_stack(tmp_path, dev_mode=True, env=env) as stack,
        chromium() as (_pw, browser),
    ):
        alice = await sign_in(browser, stack.edge_url, "alice", problems)
        bob_token = stack.token("user-bob", "bob")
        bob = await sign_in(browser, stack.edge_url, "bob", problems, token=bob_token)
        await alice.page.locator("#presence").select_option("dnd")
        await expect(bob.member("alice")).to_have_class("member status-dnd")
        await bob.send("before the new key")
        await expect(alice.message("before the new key")).to_have_count(1)

        # The edge comes back signing with another key.
        old = stack.edges[0]
        port = old.port("http_port")
        await old.kill()
        stack.edges[0] = await start_service(
            "edge0",
            "edge",
            {**old.env, "WADDLE_EDGE_PORT": str(port), "WADDLE_JWT_SECRET": NEW_SECRET},
            log_path=tmp_path / "edge0-new-key.log",
        )

        # Alice's page got a new development token by itself, and says so.
        await expect(alice.page.locator("#notices")).to_contain_text("signed in again")
        await alice.expect_connected()
        await alice.send("after the new key")
        await expect(alice.message("after the new key")).to_have_attribute("data-state", "acked")

        # Bob is told why and asked for a token; no endless "Reconnecting".
        banner = bob.page.locator("#banner")
        await expect(banner).to_contain_text("The server refused your token")
        await expect(bob.page.locator("#token-form")).to_be_visible()
        await expect(banner).not_to_contain_text("Reconnecting")
        fresh = jwt.encode(
            {
                "sub": "user-bob",
                "username": "bob",
                "permissions": ["read", "write"],
                "exp": int(time.time()) + 3600,
            },
            NEW_SECRET,
            algorithm="HS256",
        )
        await bob.page.locator("#new-token").fill(fresh)
        await bob.page.get_by_role("button", name="Use this token").click()
        await bob.expect_connected()
        await expect(banner).to_be_hidden()
        await expect(bob.message("before the new key")).to_have_class(MINE)
        await expect(bob.message("after the new key").locator(".author")).to_have_text("alice")

        # Her status survived the reconnect: picker, her own entry and Bob's list agree.
        await expect(alice.page.locator("#presence")).to_have_value("dnd")
        await expect(alice.member("alice")).to_have_class("member status-dnd")
        await expect(bob.member("alice")).to_have_class("member status-dnd")
    assert problems.found == []
