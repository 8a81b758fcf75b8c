"""Two browsers chat through the demo page served by the edge, on the real stack.

The page must be served with the strict Content-Security-Policy it is
written for, and any console message of level error or warning (a CSP
violation among them) or any uncaught exception fails the test.

Needs Debian's Chromium (``apt-get install -y chromium``) and the Python
package ``playwright`` (it drives the system Chromium; no browser download).
Without Chromium the test is skipped, unless ``CI=true``: then it fails.
Set ``WADDLE_SCREENSHOT=/path.png`` to keep a screenshot of the chat.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Error,
    Page,
    async_playwright,
    expect,
)

from tests.support.stack import start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STRICT_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; "
    "script-src 'self'; img-src 'self' data:"
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
STEP_MS = 15_000
expect.set_options(timeout=STEP_MS)


def directives(policy: str) -> dict[str, set[str]]:
    """``"a x y; b z"`` -> ``{"a": {"x", "y"}, "b": {"z"}}``."""
    parsed: dict[str, set[str]] = {}
    for part in policy.split(";"):
        if part.strip():
            name, *values = part.split()
            parsed[name.lower()] = set(values)
    return parsed


def assert_strict_policy(header: str | None) -> None:
    """The page is served under (at least) the strict policy it is written for."""
    assert header, "the edge serves / without a Content-Security-Policy"
    served = directives(header)
    for name, values in directives(STRICT_CSP).items():
        assert served.get(name) == values, f"CSP {name}: {served.get(name)} != {values}"


def chromium_executable() -> str:
    """Path of the system Chromium; skip (or fail under CI=true) without it."""
    for candidate in (
        os.environ.get("WADDLE_CHROMIUM", ""),
        "/usr/bin/chromium",
        shutil.which("chromium") or "",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI") == "true":
        pytest.fail("Chromium is required under CI=true: apt-get install -y chromium")
    pytest.skip("Chromium is not installed (apt-get install -y chromium)")


async def open_chat(
    browser: Browser, edge_url: str, name: str, channel: str, problems: list[str]
) -> Page:
    """Open the page in a fresh browser context, join ``channel`` as ``name``."""
    context = await browser.new_context(viewport={"width": 1100, "height": 700})
    context.set_default_timeout(STEP_MS)
    page = await context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"{name}: console {message.type}: {message.text}")

    def on_page_error(error: Error) -> None:
        problems.append(f"{name}: uncaught {error}")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)

    response = await page.goto(f"{edge_url}/")
    assert response is not None and response.ok, f"GET / answered {response}"
    assert_strict_policy(await response.header_value("content-security-policy"))
    await page.fill("#name", name)
    await page.fill("#channel", channel)
    await page.click("#join-button")
    await expect(page.locator("#conn-state")).to_have_class(re.compile(r"\bstate-open\b"))
    return page


async def test_two_pages_chat_live(tmp_path: Path) -> None:
    executable = chromium_executable()
    channel = f"web-{uuid.uuid4().hex[:10]}"
    problems: list[str] = []
    async with start_stack(tmp_path, dev_mode=True) as stack, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            alice = await open_chat(browser, stack.edge_url, "alice", channel, problems)
            bob = await open_chat(browser, stack.edge_url, "bob", channel, problems)

            # Bob sees Alice in the online list.
            await expect(
                bob.locator("#users .user-name").filter(has_text=re.compile(r"^alice$"))
            ).to_have_count(1)

            # Alice types: Bob sees the indicator.
            composer = alice.locator("#composer")
            await composer.press_sequentially("<b>x</b>")
            await expect(bob.locator("#typing")).to_have_text("alice is typing…")

            # Alice sends markup: Bob shows it literally, as text.
            await composer.press("Enter")
            received = bob.locator("#messages .msg .content").filter(has_text="<b>x</b>")
            await expect(received).to_have_count(1)
            await expect(received).to_have_text("<b>x</b>")
            assert await bob.locator("#messages b").count() == 0
            assert "&lt;b&gt;x&lt;/b&gt;" in await received.inner_html()
            await expect(bob.locator("#messages .msg .author").last).to_have_text("alice")

            # Sending ends the typing indicator; the sender's copy is acknowledged.
            await expect(bob.locator("#typing")).to_have_text("")
            await expect(alice.locator("#messages .msg.pending")).to_have_count(0)
            await expect(
                alice.locator("#messages .msg .content").filter(has_text="<b>x</b>")
            ).to_have_count(1)

            # A presence change shows in the other page's list.
            await alice.select_option("#presence", "away")
            away = bob.locator("#users .user.status-away .user-name")
            await expect(away).to_have_text("alice")

            # A reply in the other direction.
            await bob.locator("#composer").fill("hi alice")
            await bob.locator("#composer").press("Enter")
            await expect(
                alice.locator("#messages .msg .content").filter(has_text="hi alice")
            ).to_have_count(1)

            screenshot = os.environ.get("WADDLE_SCREENSHOT")
            if screenshot:
                await alice.screenshot(path=screenshot)
        finally:
            await browser.close()
    assert problems == []
